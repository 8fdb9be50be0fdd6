"""The package's layers point one way, and no modules import each other in a circle.

Every import in ``verl_omni`` (module level or inside a function) is read from the source with ``ast``; a module
may import its own layer or the layers below it, never one above.
"""

import ast
import pathlib
from collections import defaultdict

PKG = pathlib.Path(__file__).resolve().parents[1] / "verl_omni"

# Lowest first. registration.py / __init__.py / version.py sit on top: they wire the package into verl.
# "families" is the part of pipelines/ that the config reads: the registry, and in each family's package its
# declaration (__init__, options, standin, published); its RL pipeline (pipeline.py and what it uses) reads the
# config (see _layer).
LAYERS = [
    {"core"},
    {"schedulers", "models", "algorithms"},
    {"families"},
    {"config"},
    {"rewards"},
    {"pipelines"},
    {"workers"},
    {"rollout"},
    {"agent_loop"},
    {"trainer"},
    {"export", "eval", "compare"},  # user commands over a run's outputs
    {"registration", "__init__", "version"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(imported verl_omni module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "verl_omni" or name.startswith("verl_omni."):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[1:2] == ["pipelines"] and _is_family_declaration(parts[2:]):
        return "families"
    return parts[1] if len(parts) > 1 else "__init__"


# A family package's modules that declare it (what the config reads); the others (pipeline.py, and what it uses, such
# as an engine attention processor) are its RL pipeline.
FAMILY_DECLARATION_MODULES = ([], ["options"], ["standin"], ["published"])


def _is_family_declaration(parts: list[str]) -> bool:
    """``verl_omni.pipelines`` itself (and the names it exports), its ``registry`` and ``standins``, and a family
    package's declaration modules (``__init__``, ``options``, ``standin``, ``published``). ``parts``: the dotted
    name below ``verl_omni.pipelines``."""
    if not parts:
        return True
    head = PKG / "pipelines" / parts[0]
    if head.is_dir():
        # published.py, and modules it splits into (published_<part>.py): the real checkpoint's configs
        return parts[1:2] in FAMILY_DECLARATION_MODULES or parts[1].startswith("published_")
    if head.with_suffix(".py").is_file():
        return parts[0] in ("registry", "standins")
    return True  # a name exported by verl_omni/pipelines/__init__.py


def _lazy_family_pipeline(here: str, name: str, module_level: bool) -> bool:
    """The one import against the layers: a family's ``ModelFamily.pipeline_class()`` imports its own RL pipeline
    inside the function (``verl_omni.pipelines.<family>`` -> ``verl_omni.pipelines.<family>.pipeline``)."""
    return not module_level and here.count(".") == 2 and name.startswith(f"{here}.pipeline")


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in PKG.rglob("*.py"):
        here = _module_name(path)
        for name, line, module_level in _imports(path):
            if name == "verl_omni" or _lazy_family_pipeline(here, name, module_level):
                continue
            if RANK[_layer(name)] > RANK[_layer(here)]:
                upward.append(f"{path.relative_to(PKG.parent)}:{line} ({_layer(here)}) imports {name}")
    assert not upward, "imports that run against the layers:\n" + "\n".join(upward)


def test_every_package_folder_has_a_layer():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PKG.glob("*.py")}
    assert folders | modules <= set(RANK), sorted((folders | modules) - set(RANK))


def test_no_import_cycles_between_modules():
    known = {_module_name(p) for p in PKG.rglob("*.py")}
    graph = defaultdict(set)
    for path in PKG.rglob("*.py"):
        here = _module_name(path)
        for name, _, module_level in _imports(path):
            # ``from pkg import name`` may name a module or an attribute: keep the longest known module.
            while name not in known and "." in name:
                name = name.rpartition(".")[0]
            if module_level and name != here and name in known:
                graph[here].add(name)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(known):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own submodule is not a circle unless the submodule imports it back.
    real = [c for c in cycles if len(c) > 2 or c[0] != c[-1]]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)
