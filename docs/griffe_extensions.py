"""Griffe extensions used by mkdocs.yml to render the API reference.

- `PackageDir` loads subpackages that setuptools maps to another folder: pyproject.toml ships the repository's
  top-level `kernels/` folder as `hf_neuralcache.kernels`, which griffe (scanning only `hf_neuralcache/`) misses.
- `TransformersDocstrings` rewrites our transformers-style docstrings into the Google style that mkdocstrings
  parses: ``name (`int`, *optional*, defaults to 4):`` becomes ``name (int): *Optional*, defaults to `4`.``, and
  transformers' cross-references such as ``[`Cache`]`` become plain code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Attributes|Returns|Yields|Raises):\s*$")
_PARAMETER = re.compile(r"^(?P<indent>\s+)(?P<name>\*{0,2}\w+) \((?P<type>`[^:]*?)\):(?P<rest>.*)$")
_TYPED_ITEM = re.compile(r"^(?P<indent>\s+)(?P<type>`[^:]*?):(?P<rest>\s.*|)$")
_CROSS_REFERENCE = re.compile(r"\[`(?P<tilde>~?)(?P<path>[\w.]+)`\](?![\[(])")


class PackageDir(griffe.Extension):
    """Attach `packages` (dotted name -> folder relative to the working directory) to their parent package."""

    def __init__(self, packages: dict[str, str]) -> None:
        super().__init__()
        self.packages = {name: Path(folder) for name, folder in packages.items()}

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for dotted, folder in self.packages.items():
            parent_path, _, name = dotted.rpartition(".")
            if parent_path.split(".", 1)[0] != pkg.name:
                continue
            parent = pkg if parent_path == pkg.name else pkg[parent_path.split(".", 1)[1]]
            self._load_folder(parent, name, folder, loader)

    def _load_folder(self, parent: griffe.Module, name: str, folder: Path, loader: griffe.GriffeLoader) -> None:
        init = folder / "__init__.py"
        if not init.is_file():
            raise FileNotFoundError(f"{folder}, mapped to {parent.path}.{name}, has no __init__.py")
        module = self._visit(parent, name, init, loader)
        for child in sorted(folder.iterdir()):
            if child.is_dir() and (child / "__init__.py").is_file():
                self._load_folder(module, child.name, child, loader)
            elif child.suffix == ".py" and child.name != "__init__.py":
                self._visit(module, child.stem, child, loader)

    @staticmethod
    def _visit(parent: griffe.Module, name: str, path: Path, loader: griffe.GriffeLoader) -> griffe.Module:
        module = griffe.visit(
            name,
            path.resolve(),
            path.read_text(encoding="utf-8"),
            parent=parent,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )
        parent.set_member(name, module)
        return module


def google_style(text: str) -> str:
    """Rewrite one transformers-style docstring into Google style (see the module docstring)."""
    lines, section = [], None
    for line in text.splitlines():
        header = _SECTION.match(line)
        if header:
            section = header.group(1)
        elif line.strip() and not line.startswith((" ", "\t")):
            section = None  # back to free text
        parameter = _PARAMETER.match(line) if section in ("Args", "Arguments", "Parameters", "Attributes") else None
        item = _TYPED_ITEM.match(line) if section in ("Returns", "Yields", "Raises") else None
        if parameter:
            kind, *extras = (part.strip() for part in re.split(r",\s*(?=\*optional\*|defaults to)", parameter["type"]))
            extras = [extra.replace("*optional*", "*Optional*") for extra in extras]
            rest = parameter["rest"].strip()
            note = ", ".join(extras) + "." if extras else ""
            description = " ".join(part for part in (note, rest) if part)
            line = f"{parameter['indent']}{parameter['name']} ({kind.replace('`', '')}): {description}".rstrip()
        elif item:
            line = f"{item['indent']}{item['type'].replace('`', '')}:{item['rest']}"
        lines.append(line)
    text = "\n".join(lines)
    return _CROSS_REFERENCE.sub(
        lambda m: f"`{m['path'].rsplit('.', 1)[-1] if m['tilde'] else m['path']}`",
        text,
    )


class TransformersDocstrings(griffe.Extension):
    """Rewrite every docstring of a loaded package with [`google_style`] before it is parsed."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._rewrite(pkg)

    def _rewrite(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = google_style(obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member)
