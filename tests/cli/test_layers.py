"""Imports point one way: cli -> experiments -> methods -> tinymem -> eval -> integrations -> ops -> common.
A module may import its own layer or the ones below, never one above (also not lazily, inside a function)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "tinymem_fast")
LAYER = {"common": 0, "ops": 1, "kernels": 1, "_C": 1, "integrations": 2, "eval": 3, "tinymem": 4,
         "methods": 5, "experiments": 6, "cli": 7, "__main__": 8}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    for folder, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
            is_pkg = rel.endswith(".__init__")
            module = rel[: -len(".__init__")] if is_pkg else rel
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    b = base[: len(base) - (node.level - 1)]
                    target = ".".join(b + ([node.module] if node.module else []))
                    targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                    for t in targets:
                        yield module, t
                elif isinstance(node, ast.ImportFrom | ast.Import):
                    is_from = isinstance(node, ast.ImportFrom)
                    for t in [node.module] if is_from else [a.name for a in node.names]:
                        if t and t.startswith("tinymem_fast."):
                            yield module, t


def test_no_module_imports_a_layer_above_it():
    upward = [f"{m} imports {t}" for m, t in _imports()
              if _area(m) != "__init__" and LAYER.get(_area(t), 0) > LAYER.get(_area(m), 0)]
    assert not upward, "\n".join(upward)


def test_every_area_is_known():
    areas = {_area(m) for m, _ in _imports()} - {"__init__"}
    assert areas <= set(LAYER), areas - set(LAYER)
