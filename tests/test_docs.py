"""The documentation says what the code does: docs/configuration.md is what
tools/config_reference.py writes from today's configs, every template field has its comment, and
the README's numbered claims are the tolerances the tests assert."""
from __future__ import annotations

import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location('config_reference',
                                                  ROOT / 'tools' / 'config_reference.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current():
    tool = _tool()
    text = tool.generate()
    stored = (ROOT / 'docs' / 'configuration.md').read_text(encoding='utf-8')
    assert stored == text, 'docs/configuration.md is stale: run python tools/config_reference.py'


def test_every_template_field_is_documented_with_its_default():
    tool = _tool()
    template = tool.flatten(tool._module(tool.TEMPLATE).get_config().to_dict())  # pylint: disable=protected-access
    comments = tool.all_comments(tool.config_names())
    missing = ['.'.join(k) for k in template if not comments.get(k)]
    assert not missing, (f'config fields without a `# comment` beside their assignment: {missing} '
                         '(configs/cifar10.py, configs/model_configs.py or the section builders '
                         'in tools/config_reference.SECTION_BUILDERS)')
    text = tool.generate()
    for key, value in template.items():
        assert f'| `{".".join(key)}` | {tool._fmt(value)} |' in text  # pylint: disable=protected-access


def test_comment_parser_reads_aliases_and_comment_blocks(tmp_path):
    """The parser against a config written here: alias chains, trailing comments, a comment
    block above an assignment, and a section builder's local ConfigDict."""
    source = tmp_path / 'cfg.py'
    source.write_text(
        'def get_config():\n'
        '    config = ConfigDict()\n'
        '    config.data = d = ConfigDict()\n'
        '    d.size = 32  # pixels per side\n'
        '    t = config.training\n'
        '    # first line\n'
        '    # second line\n'
        '    t.steps = 10\n'
        '    config.name = "x"  # run name\n'
        '    t.undocumented = 1\n'
        'def section():\n'
        '    c = ConfigDict()\n'
        '    c.method = "ddim"  # sampler\n'
        '    return c\n', encoding='utf-8')
    tool = _tool()
    assert tool.field_comments(source, 'get_config') == {
        ('data', 'size'): 'pixels per side', ('training', 'steps'): 'first line second line',
        ('name',): 'run name'}
    assert tool.field_comments(source, 'section', 'sampling') == {('sampling', 'method'): 'sampler'}


def _readme() -> str:
    return (ROOT / 'README.md').read_text(encoding='utf-8')


def test_readme_starts_with_the_two_commands():
    text = _readme()
    blocks = re.findall(r'```bash\n(.*?)\n```', text, re.S)
    assert 'python -m diffusion_jax.main --config=configs/digits.py' in blocks[0]
    marker = text.index('<!-- test-command -->')
    assert text.index(blocks[1]) > marker > text.index(blocks[0])
    assert 'python -m pytest' in blocks[1]


def test_readme_claims_are_the_asserted_tolerances():
    text = ' '.join(_readme().split())
    inception = (ROOT / 'tests' / 'test_inception.py').read_text(encoding='utf-8')
    diffusion = (ROOT / 'tests' / 'test_diffusion.py').read_text(encoding='utf-8')
    assert 'to within 1e-5 relative error' in text
    assert 'assert all(e <= 1e-5 for e in errors.values())' in inception
    assert 'less than 0.05 bits/dim above it' in text
    assert 'assert total.mean() - entropy_bits < 0.05' in diffusion
    assert 'within 5 standard errors' in text
    assert 'assert total.mean() > entropy_bits - 5 * se' in diffusion
