"""The import structure of `ldm/`, read from the source with `ast` (imports inside functions included): no circles,
and imports go downward only, scripts -> cli/training -> models -> modules -> small helpers. The model layer imports
no data set, training, command line or sampler; the helpers below it (loading included) import only each other."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

from tests.model_factory import REPO_DIR

SAMPLERS = ("ldm.models.diffusion.ddim", "ldm.models.diffusion.plms", "ldm.models.diffusion.sampling",
            "ldm.models.diffusion.registry", "ldm.models.diffusion.dpm_solver", "ldm.models.diffusion.k_sampler",
            "ldm.models.diffusion.k_sampling", "ldm.models.diffusion.sigma_denoiser",
            "ldm.models.diffusion.sigma_schedules", "ldm.models.diffusion.noise_samplers",
            "ldm.models.diffusion.sampler_names")
MODEL_LAYER = ("ldm.models", "ldm.modules")
ABOVE_THE_MODEL = ("ldm.data", "ldm.training", "ldm.cli", "ldm.evaluation", "ldm.lightning", "ldm.prompts", *SAMPLERS)
HELPERS = ("ldm.util", "ldm.errors", "ldm.config_files", "ldm.safetensors_mmap", "ldm.schedule_buffers",
           "ldm.placeholder_tokens", "ldm.lr_scheduler", "ldm.demo", "ldm.checkpoint", "ldm.original_names",
           "ldm.lora", "ldm.lora.files", "ldm.lora.layers", "ldm.lora.targets", "ldm.lora.architecture",
           "ldm.lora.merge", "ldm.vae_files", "ldm.inpainting_checkpoint", "ldm.diffusers_folder",
           "ldm.diffusers_format", "ldm.diffusers_loading")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every dotted name an import statement of `tree` names, wherever it stands; `from a import b` gives `a.b`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path, package: str = "ldm") -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (a name is taken as the longest module it starts with)."""
    files = {module_name(path, root): path for path in (root / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for imported in imported_names(ast.parse(path.read_text(encoding="utf-8")), own_package):
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def forbidden_imports(graph: dict[str, set[str]], importers: tuple[str, ...], targets: tuple[str, ...],
                      exempt: tuple[str, ...] = ()) -> list[str]:
    return sorted(f"{source} -> {target}" for source, imported in graph.items()
                  if within(source, importers) and not within(source, exempt)
                  for target in imported if within(target, targets))


@lru_cache(maxsize=None)
def ldm_graph() -> dict[str, set[str]]:
    return import_graph(REPO_DIR)


def test_the_graph_sees_imports_inside_functions():
    assert "ldm.checkpoint" in ldm_graph()["ldm.models.diffusion.ddpm"]  # imported inside init_from_ckpt


def test_no_import_circles():
    assert circles(ldm_graph()) == []


def test_the_model_imports_no_data_training_command_line_or_sampler():
    assert forbidden_imports(ldm_graph(), MODEL_LAYER, ABOVE_THE_MODEL, exempt=SAMPLERS) == []


def test_helpers_below_the_model_import_only_each_other():
    graph = ldm_graph()
    assert all(helper in graph for helper in HELPERS)
    assert sorted(f"{helper} -> {target}" for helper in HELPERS for target in graph[helper]
                  if not within(target, HELPERS)) == []


def test_the_checks_find_a_circle_and_an_upward_import(tmp_path):
    package = tmp_path / "ldm"
    for path, text in {"__init__.py": "", "util.py": "def f():\n    from ldm.checkpoint import load\n",
                       "checkpoint.py": "from ldm.util import f\nload = f\n",
                       "modules/__init__.py": "", "modules/layer.py": "from ldm.data.base import Items\n",
                       "data/__init__.py": "", "data/base.py": "from ..modules import layer\nItems = list\n"}.items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(text)
    graph = import_graph(tmp_path)
    assert circles(graph) == [["ldm.checkpoint", "ldm.util"], ["ldm.data.base", "ldm.modules.layer"]]
    assert forbidden_imports(graph, MODEL_LAYER, ABOVE_THE_MODEL) == ["ldm.modules.layer -> ldm.data.base"]
