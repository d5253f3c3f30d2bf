"""The graph contract has one home (edet_deploy/contract.py) and the package's imports form no cycle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import edet_deploy
from edet_deploy import contract

PACKAGE = Path(edet_deploy.__file__).parent


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("name", contract.OUTPUTS)
def test_output_names_written_only_in_contract(name):
    pattern = re.compile(rf"""["']{name}["']""")
    holders = [str(p.relative_to(PACKAGE)) for p in _sources() if pattern.search(p.read_text())]
    assert holders == ["contract.py"]


# Triton's wire names. The graph input's name `images` also names JSON keys and a CLI argument elsewhere, so it is
# looked for in the Triton package only.
WIRE_NAMES = (contract.IMAGE, contract.SCALE, contract.ORIG_SIZE, contract.DETECTION_LABELS,
              contract.raw_output_name(""))


def _spelled(name: str) -> re.Pattern:
    return re.compile(rf"""["']{name}(["']|{{)""")  # the name quoted, or an f-string starting with it


@pytest.mark.parametrize("name", WIRE_NAMES)
def test_triton_wire_names_written_only_in_contract(name):
    holders = [str(p.relative_to(PACKAGE)) for p in _sources() if _spelled(name).search(p.read_text())]
    assert holders == ["contract.py"]


def test_graph_input_name_not_spelled_in_triton_package():
    holders = [str(p.relative_to(PACKAGE)) for p in (PACKAGE / "triton").rglob("*.py")
               if _spelled(contract.INPUT_NAME).search(p.read_text())]
    assert holders == []


def test_wire_name_check_sees_a_spelled_out_name():
    source = 'tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")\nraw = f"raw_{name}"\n'
    assert _spelled(contract.IMAGE).search(source) and _spelled(contract.raw_output_name("")).search(source)
    assert not _spelled(contract.IMAGE).search("get_input_tensor_by_name(request, IMAGE)")


def test_output_specs_match_design():
    shapes = {s.name: (s.dtype, s.shape("B", 100)) for s in contract.OUTPUT_SPECS}
    assert shapes == {"num_detections": ("int32", ("B", 1)), "detection_boxes": ("float32", ("B", 100, 4)),
                      "detection_scores": ("float32", ("B", 100)), "detection_classes": ("int32", ("B", 100))}
    assert (contract.INPUT_NAME, contract.INPUT_DTYPE, contract.INPUT_LAYOUT) == ("images", "uint8", "NHWC")


def test_consumers_use_the_contract():
    from edet_deploy.nms import op
    from edet_deploy.trt import plugin

    assert op.OUTPUTS == contract.OUTPUTS
    assert op.OUTPUT_TYPES == {"num_detections": 6, "detection_boxes": 1, "detection_scores": 1,
                               "detection_classes": 6}
    assert plugin.output_specs("b", 500, 7) == [("num_detections", "int32", ("b", 1)),
                                                ("detection_boxes", "float32", ("b", 7, 4)),
                                                ("detection_scores", "float32", ("b", 7)),
                                                ("detection_classes", "int32", ("b", 7))]


def test_names():
    assert contract.artifact_name("d0") == "efficientdet_d0"
    assert contract.artifact_name("d3", "fp16") == "efficientdet_d3.fp16"
    assert contract.artifact_name("d0", "int8-minmax") == "efficientdet_d0.int8-minmax"
    assert contract.artifact_name("d0", nms=False) == "efficientdet_d0_nonms"
    assert contract.member_names("efficientdet_d0") == ("efficientdet_d0_preprocess", "efficientdet_d0_engine",
                                                        "efficientdet_d0_postprocess")
    assert contract.ensemble_name("m", "decoded") == "m_decoded"
    assert contract.preprocess_name("m", "decoded") == "m_preprocess_decoded"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(tmp_path))
    assert contract.cache_dir() == tmp_path
    monkeypatch.delenv("EDET_DEPLOY_CACHE")
    assert contract.cache_dir() == Path.home() / ".cache" / "edet_deploy"


def _module_name(path: Path) -> str:
    parts = ["edet_deploy", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict:
    """module -> the package modules it imports (module level and inside functions)."""
    modules = {_module_name(p): p for p in _sources()}
    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the submodule when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:  # a name inside a module -> that module
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "edet_deploy.contract" in graph["edet_deploy.nms.op"]
    # Importing a package runs its __init__: a parent package's edges count for its children's importers,
    # which the walk covers because `from .nms import x` resolves to edet_deploy.nms (its __init__).
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _floors() -> dict:
    """module prefix -> floor, read from the layering picture in docs/architecture.md (the one place it is
    written)."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    block = page.split("<!-- floors -->", 1)[1].split("<!-- /floors -->", 1)[0]
    floors = {}
    for floor, names in re.findall(r"^floor (\d+)\s+\S+\s+(.+)$", block, flags=re.M):
        for name in names.split(","):
            name = name.strip()
            floors["edet_deploy" if name == "edet_deploy" else f"edet_deploy.{name}"] = int(floor)
    return floors


def _floor_of(module: str, floors: dict):
    """The floor of the longest prefix naming the module or one of its packages (None: placed nowhere)."""
    if module == "edet_deploy":
        return floors.get(module)
    name = module
    while name != "edet_deploy":  # the package root's floor is its __init__'s, not a default for the rest
        if name in floors:
            return floors[name]
        name = name.rpartition(".")[0]
    return None


def _upward_imports(graph: dict, floors: dict) -> list:
    return sorted(f"{m} (floor {_floor_of(m, floors)}) imports {d} (floor {_floor_of(d, floors)})"
                  for m, deps in graph.items() for d in deps
                  if _floor_of(d, floors) > _floor_of(m, floors))


def test_layering_checker_finds_an_upward_import():
    floors = {"edet_deploy": 0, "edet_deploy.low": 0, "edet_deploy.high": 1, "edet_deploy.high.sub": 0}
    assert _floor_of("edet_deploy.elsewhere", floors) is None
    assert _upward_imports({"edet_deploy.low": {"edet_deploy.high"}}, floors)
    assert _upward_imports({"edet_deploy.high": {"edet_deploy.low"}}, floors) == []
    assert _upward_imports({"edet_deploy.high.sub": {"edet_deploy.high.x"}}, floors)  # longest prefix wins


def test_imports_follow_the_documented_layering():
    floors, graph = _floors(), _import_graph()
    assert len(set(floors.values())) >= 5, "the layering picture in docs/architecture.md was not read"
    unplaced = sorted(m for m in graph if _floor_of(m, floors) is None)
    assert unplaced == [], f"modules on no floor of the layering picture (docs/architecture.md): {unplaced}"
    stale = sorted(p for p in floors if p not in graph and not any(m.startswith(p + ".") for m in graph))
    assert stale == [], f"the layering picture (docs/architecture.md) names modules that do not exist: {stale}"
    assert _upward_imports(graph, floors) == []


@pytest.mark.parametrize("name", contract.CANDIDATES)
def test_candidate_names_written_only_in_contract(name):
    pattern = re.compile(rf"""["']{name}["']""")
    holders = [str(p.relative_to(PACKAGE)) for p in _sources() if pattern.search(p.read_text())]
    assert holders == ["contract.py"]


# Blocks `import torch` (and its submodules) in a fresh interpreter: a lazy import reached at import time fails.
_NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
"""


def test_precision_imports_without_torch():
    """The ONNX-only precision transforms, the soft-NMS node surgery and the graph writer need no PyTorch."""
    import subprocess
    import sys

    modules = sorted(m for m in _import_graph() if m.startswith("edet_deploy.precision"))
    modules += ["edet_deploy.nms.graph", "edet_deploy.artifacts"]
    code = _NO_TORCH + "".join(f"import {m}\n" for m in modules) + "assert 'torch' not in sys.modules\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "edet_deploy.precision.convert" in modules
