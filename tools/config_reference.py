"""Writes docs/configuration.md, the configuration reference, from the configs themselves.

    python tools/config_reference.py            # rewrite docs/configuration.md
    python tools/config_reference.py --check    # exit 1 if the checked-in file is stale

Every field of every section of the template config (configs/cifar10.py) with its default and the
`# comment` written beside its assignment (in configs/*.py, configs/model_configs.py,
diffusion_jax/defaults.default_sampling_config or default_eval_config), then the fields only some configs have, then per
config file the fields it changes. Comments are read from the source with `ast` and `tokenize`:
the trailing comment of an assignment `alias.field = value  # comment`, else the comment lines
right above it. tests/test_docs.py regenerates the text in memory and compares, so a new config
field without a regenerated reference fails CI.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import io
import pathlib
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / 'docs' / 'configuration.md'
TEMPLATE = 'cifar10'  # every other config starts from this file and overrides
NOT_CONFIGS = ('__init__', 'model_configs')  # helper modules of configs/, no get_config
# Where a section's fields are assigned when not in a config file itself: the function that
# builds the section and the section its local ConfigDict becomes.
SECTION_BUILDERS = (
    ('diffusion_jax/defaults.py', 'default_sampling_config', 'sampling'),
    ('diffusion_jax/defaults.py', 'default_eval_config', 'eval'),
    ('configs/model_configs.py', None, 'model'),  # every function there builds a model section
)


# ----------------------------------------------------------------------------------------------
# Comments from the source
# ----------------------------------------------------------------------------------------------
def _comments_by_line(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip('#').strip()
    return out


def _attribute_path(node) -> list[str] | None:
    """config.data.image_size -> ['config', 'data', 'image_size']; None if not a plain chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _comment_of(stmt, comments: dict[int, str], lines: list[str]) -> str:
    trailing = comments.get(stmt.end_lineno)
    if trailing and not lines[stmt.end_lineno - 1].lstrip().startswith('#'):
        return trailing
    above, line = [], stmt.lineno - 1
    while line >= 1 and lines[line - 1].lstrip().startswith('#'):
        above.insert(0, comments[line])
        line -= 1
    return ' '.join(above)


def field_comments(path: pathlib.Path, function: str | None = None,
                   section: str | None = None) -> dict[tuple[str, ...], str]:
    """(section, field) -> comment for every commented assignment in path's functions.

    Aliases are tracked per function: `config.diffusion = d = ConfigDict()` or `d = config.diffusion`
    make `d.x = ...` a field of 'diffusion'. With `section`, the function's local ConfigDict
    variables (`c = ConfigDict()` / `c = other_builder()`) stand for that section.
    """
    source = path.read_text(encoding='utf-8')
    comments, lines = _comments_by_line(source), source.splitlines()
    out: dict[tuple[str, ...], str] = {}
    for fn in ast.parse(source).body:
        if not isinstance(fn, ast.FunctionDef) or (function and fn.name != function):
            continue
        alias: dict[str, tuple[str, ...]] = {'config': ()}
        for stmt in ast.walk(fn):
            if not isinstance(stmt, ast.Assign):
                continue
            paths = [_attribute_path(t) for t in stmt.targets]
            value = _attribute_path(stmt.value)
            for target, p in zip(stmt.targets, paths):
                if isinstance(target, ast.Name):
                    others = [q for q in paths if q and len(q) > 1 and q[0] in alias]
                    if others:  # config.diffusion = d = ...
                        alias[target.id] = alias[others[0][0]] + tuple(others[0][1:])
                    elif value and value[0] in alias:  # d = config.diffusion
                        alias[target.id] = alias[value[0]] + tuple(value[1:])
                    elif section is not None:  # c = ml_collections.ConfigDict()
                        alias[target.id] = (section,)
            for p in paths:
                if p and len(p) > 1 and p[0] in alias:
                    key = alias[p[0]] + tuple(p[1:])
                    text = _comment_of(stmt, comments, lines)
                    if text and key not in out:
                        out[key] = text
    return out


def all_comments(config_names: list[str]) -> dict[tuple[str, ...], str]:
    """The template's comments first, then the section builders', then the other configs'."""
    out: dict[tuple[str, ...], str] = {}
    sources = [(ROOT / 'configs' / f'{TEMPLATE}.py', None, None)]
    sources += [(ROOT / p, fn, sec) for p, fn, sec in SECTION_BUILDERS]
    sources += [(ROOT / 'configs' / f'{n}.py', None, None) for n in config_names if n != TEMPLATE]
    for path, fn, sec in sources:
        for key, text in field_comments(path, fn, sec).items():
            out.setdefault(key, text)
    return out


# ----------------------------------------------------------------------------------------------
# Values from the configs
# ----------------------------------------------------------------------------------------------
def config_names() -> list[str]:
    names = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem not in NOT_CONFIGS)
    return [n for n in names if hasattr(_module(n), 'get_config')]


def variants(name: str) -> list[str | None]:
    """The config args to document: None (the plain file), or, for a file of presets
    (configs/pretrained.py:PRESET), each of its PRESETS."""
    presets = getattr(_module(name), 'PRESETS', None)
    return [None] if presets is None else list(presets)


def _label(name: str, arg: str | None) -> str:
    return name if arg is None else f'{name}:{arg}'


def _module(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f'configs.{name}')


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e4:
        text = f'{int(value):_}.0'
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1e4:
        text = f'{value:_}'
    elif isinstance(value, list):
        text = repr(tuple(value))
    else:
        text = repr(value)
    return '`' + text.replace('|', '\\|') + '`'


def _cell(text: str) -> str:
    return text.replace('|', '\\|')


def _first_doc_line(module) -> str:
    doc = (module.__doc__ or '').strip().splitlines()
    return doc[0] if doc else ''


# ----------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------
HEADER = """# Configuration reference

<!-- Generated by `python tools/config_reference.py` from configs/ and
diffusion_jax/generate.py; do not edit by hand (tests/test_docs.py fails if it is stale). -->

A run is configured by one `get_config(arg=None)` file in `configs/` returning an
`ml_collections.ConfigDict`. Pick one with `--config=configs/NAME.py` (options after a colon, e.g.
`--config=configs/cifar10.py:runlocal`) and change any field on the command line with
`--config.SECTION.FIELD=VALUE`, e.g. `--config.training.batch_size=64`. Every config starts from
`configs/cifar10.py` (Ho et al. 2020) and overrides; the tables below list the template's fields
with their defaults and the comment beside each assignment, then what each config file changes.
"""


def _section_tables(template: dict, comments: dict) -> list[str]:
    out = []
    sections: dict[str, list] = {}
    for key, value in template.items():
        sections.setdefault(key[0] if len(key) > 1 else '', []).append((key, value))
    order = [s for s in sections if s == ''] + [s for s in sections if s != '']
    for section in order:
        title = 'Top level' if section == '' else f'`{section}`'
        out += [f'### {title}', '', '| field | default | meaning |', '|---|---|---|']
        for key, value in sections[section]:
            out.append(f'| `{".".join(key)}` | {_fmt(value)} | {_cell(comments.get(key, ""))} |')
        out.append('')
    return out


def generate() -> str:
    names = config_names()
    labels = {_label(n, a): (n, a) for n in names for a in variants(n)}
    flat = {label: flatten(_module(n).get_config(a).to_dict()) for label, (n, a) in labels.items()}
    comments = all_comments(names)
    template = flat[TEMPLATE]
    lines = [HEADER, f'## The template, `configs/{TEMPLATE}.py`', '']
    lines += _section_tables(template, comments)

    extra: dict[tuple[str, ...], list[str]] = {}
    for name in flat:
        for key in flat[name]:
            if key not in template:
                extra.setdefault(key, []).append(name)
    if extra:
        lines += ['## Fields only some configs have', '',
                  '| field | configs | meaning |', '|---|---|---|']
        for key in sorted(extra):
            users = ', '.join(f'`{n}`' for n in extra[key])
            lines.append(f'| `{".".join(key)}` | {users} | {_cell(comments.get(key, ""))} |')
        lines.append('')

    lines += ['## What each config changes', '',
              f'Fields whose value differs from `configs/{TEMPLATE}.py` (or that it lacks).', '']
    for name, (file, arg) in labels.items():
        module = _module(file)
        options = ', '.join(f'`:{o}`' for o in getattr(module, 'OPTIONS', ())) or 'none'
        about = [_cell(_first_doc_line(module)), '', f'Options: {options}.', '']
        lines += [f'### `configs/{file}.py{"" if arg is None else ":" + arg}`', '']
        lines += about if arg is None or arg == variants(file)[0] else []
        changed = [(k, v) for k, v in flat[name].items() if k not in template or template[k] != v]
        if not changed:
            lines += ['The template itself.' if name == TEMPLATE else 'No changes.', '']
            continue
        own = field_comments(ROOT / 'configs' / f'{file}.py')  # why this file changes it
        lines += ['| field | value | template | why (the comment in this file) |',
                  '|---|---|---|---|']
        for key, value in changed:
            base = _fmt(template[key]) if key in template else '—'
            lines.append(f'| `{".".join(key)}` | {_fmt(value)} | {base} | '
                         f'{_cell(own.get(key, ""))} |')
        lines.append('')
    return '\n'.join(lines).rstrip() + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true',
                        help='exit 1 if docs/configuration.md is not what this script writes')
    parser.add_argument('--output', default=str(OUTPUT))
    args = parser.parse_args(argv)
    text = generate()
    out = pathlib.Path(args.output)
    if args.check:
        current = out.read_text(encoding='utf-8') if out.exists() else ''
        if current != text:
            print(f'error: {out} is stale: run python tools/config_reference.py', file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix('.md.tmp')
    tmp.write_text(text, encoding='utf-8')
    tmp.replace(out)  # atomic: a failure never leaves a half-written reference
    print(f'wrote {out} ({len(text.splitlines())} lines)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
