"""The dependency rule, checked on the source: every import of every module (function-level
imports included) goes to its own layer or a lower one, and no import cycle exists.

Layers, lowest first (README, "Architecture"):

  0  data_pipelines               records: writing, reading, sources (no micle_tf)
  1  micle_tf config, augment, losses, optimizers
  2  micle_tf.models              the networks (and keras_compat, the Keras workarounds)
  3  micle_tf.rundir, .inference  reading a model_dir back; predicting/embedding a split
  4  micle_tf.evaluation, .export read finished runs (never micle_tf.training)
  5  micle_tf.training            the runners, and the sweep that trains then evaluates
  6  micle_tf.demo, .cli          orchestration and flags

So evaluation and export never import training, models import none of training, evaluation
or export, and only the sweep (training/sweep.py), the demo and the CLIs start training.
A new module must be placed in a layer here.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("data_pipelines", "micle_tf")

# "name" is that module; "name.*" is every module of that package (and the package itself).
LAYERS = (
    ("data_pipelines.*",),
    ("micle_tf", "micle_tf.config", "micle_tf.augment", "micle_tf.losses",
     "micle_tf.optimizers"),
    ("micle_tf.models.*",),
    ("micle_tf.rundir", "micle_tf.inference"),
    ("micle_tf.evaluation.*", "micle_tf.export.*"),
    ("micle_tf.training.*",),
    ("micle_tf.demo", "micle_tf.demo_report", "micle_tf.cli.*"),
)


def _modules():
    """{module name: path} of every first-party module."""
    out = {}
    for package in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(root, f)
    return out


MODULES = _modules()


def _imports(name, path):
    """{(imported first-party module, line)} of one module, wherever the import statement is."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` -> the module a.b.c
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add((target, node.lineno))
    return found


def _layer(name):
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if name == entry or (entry.endswith(".*") and (
                    name == entry[:-2] or name.startswith(entry[:-1]))):
                return i
    return None


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    missing = sorted(n for n in MODULES if _layer(n) is None)
    assert not missing, (f"place these modules in a layer of LAYERS in {__file__}: {missing}")


def test_imports_go_down_the_layers():
    violations = []
    for name, imports in sorted(GRAPH.items()):
        for target, line in sorted(imports):
            if _layer(target) is not None and _layer(name) is not None \
                    and _layer(target) > _layer(name):
                violations.append(f"{MODULES[name]}:{line}: {name} (layer {_layer(name)}) "
                                  f"imports {target} (layer {_layer(target)})")
    assert not violations, "\n".join(violations)


def test_no_import_cycle():
    """A cycle (a lazy import inside a function included) means two modules are really one."""
    state, stack, cycles = {}, [], []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target, _ in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(cycles)


def test_the_walk_sees_every_kind_of_import():
    """A walk that missed imports would pass vacuously: top-level, `from pkg import mod` and
    function-level imports are all collected."""
    assert any(t == "micle_tf.rundir" for t, _ in GRAPH["micle_tf.training.finetune"])
    assert any(t == "micle_tf.config" for t, _ in GRAPH["micle_tf.rundir"])  # from pkg import mod
    assert any(t.startswith("micle_tf.training") for t, _ in GRAPH["micle_tf.demo"])  # lazy
