"""The shape of training/: no import cycle among its modules, and no tensor or generator made on
a hard-coded device (the model's or the batch's device, or ``--device``, decides)."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[2] / "training"
# Lines allowed to name a device: they say why with a "device-ok:" comment.
PRAGMA = "device-ok:"


def _modules() -> dict[str, ast.Module]:
    return {
        f"training.{p.stem}": ast.parse(p.read_text(), str(p))
        for p in sorted(TRAINING.glob("*.py"))
        if p.stem != "__init__"
    }


def _runtime_imports(tree: ast.Module) -> set[str]:
    """Every training.* module imported anywhere (functions included), except under
    ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "training":
                out.update(f"training.{a.name}" for a in node.names)
            elif node.module.startswith("training."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("training."))
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_training_import_graph_has_no_cycle():
    mods = _modules()
    graph = {name: _runtime_imports(tree) & set(mods) - {name} for name, tree in mods.items()}
    assert graph["training.train"] >= {"training.checkpoint", "training.objectives"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _hard_coded_devices(source: str, tree: ast.Module) -> list[str]:
    """Calls that put a tensor or generator on a device named in the code: ``torch.device("…")``,
    ``device="cpu"``/``"cuda"``, ``.to("cuda")``, ``.cuda()`` and ``torch.Generator()`` with no
    device (the CPU by default)."""
    lines = source.splitlines()
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = ast.unparse(node.func)
        literal = [a for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        kw = {k.arg: k.value for k in node.keywords}
        hit = (
            (f == "torch.device" and literal)
            or (
                isinstance(kw.get("device"), ast.Constant)
                and str(kw["device"].value).split(":")[0] in ("cpu", "cuda")
            )
            or (
                f.endswith(".to") and any(str(a.value).startswith(("cpu", "cuda")) for a in literal)
            )
            or f.endswith(".cuda")
            or (f == "torch.Generator" and not node.args and "device" not in kw)
            or (f == "torch.Generator" and literal)
        )
        if hit:
            span = "\n".join(lines[node.lineno - 1 : (node.end_lineno or node.lineno)])
            context = lines[node.lineno - 2] if node.lineno >= 2 else ""
            if PRAGMA not in span and PRAGMA not in context:
                bad.append(f"{node.lineno}: {span.strip()}")
    return bad


def test_no_tensor_or_generator_on_a_hard_coded_device():
    found = {}
    for path in sorted(TRAINING.glob("*.py")):
        source = path.read_text()
        bad = _hard_coded_devices(source, ast.parse(source))
        if bad:
            found[path.name] = bad
    assert not found, found


def test_the_device_check_catches_the_old_bugs():
    """What training/distill.py, dreambooth.py and controlnet.py used to do."""
    src = (
        'gen = step_generator(0, 0, step, torch.device("cpu"))\n'
        "noise = torch.randn(x.shape, generator=torch.Generator())\n"
        'vae = load_vae(name, torch.float32, device="cpu")\n'
        'x = x.to("cuda")\n'
    )
    assert len(_hard_coded_devices(src, ast.parse(src))) == 4
    ok = 'g = torch.Generator("cpu")  # device-ok: seeds are per image on the CPU\n'
    assert _hard_coded_devices(ok, ast.parse(ok)) == []
