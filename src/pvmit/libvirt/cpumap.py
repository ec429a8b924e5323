"""libvirt's CPU map: which features each named CPU model has, and which feature names a libvirt knows.

A domain's `<cpu>` names a model and lists only what differs from it; a host's capabilities likewise list only the
features beyond its model. What the model itself holds comes from libvirt's map: the files under
/usr/share/libvirt/cpu_map on a libvirt host (`FileCpuMap`, what the migration hook reads), or the daemon itself
through the API (`pvmit.libvirt.connection.ConnectionCpuMap`, for remote hosts). Both answer the `CpuMap` protocol;
tests check that they agree on every x86 model.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pvmit.catalog.facts import Vendor

DEFAULT_DIR = Path("/usr/share/libvirt/cpu_map")
VENDORS: dict[str, Vendor] = {"Intel": "intel", "AMD": "amd", "Hygon": "hygon"}
"""libvirt's vendor names (cpu_map/x86_vendors.xml) -> pvmit's."""


class CpuMapError(Exception):
    """The CPU map cannot be read; the message says where and why."""


@dataclass(frozen=True)
class ModelInfo:
    """One CPU model as libvirt defines it."""

    name: str
    vendor: Vendor | None
    signature: tuple[int, int, int | None] | None  # family, model, lowest stepping (None: any)
    features: frozenset[str]


class CpuMap(Protocol):
    where: str

    def model(self, name: str) -> ModelInfo | None:
        """The model libvirt calls `name`, or None when this libvirt has no such model."""
        ...

    def knows(self, feature: str) -> bool:
        """Does this libvirt know the feature name (so that a feature not listed is one the CPU lacks)?"""
        ...


def _parse(path: Path) -> ET.Element:
    try:
        return ET.fromstring(path.read_bytes())
    except OSError as e:
        raise CpuMapError(f"{path}: cannot read libvirt's CPU map: {e.strerror or e}") from None
    except ET.ParseError as e:
        raise CpuMapError(f"{path}: not valid XML: {e}") from None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.match(r"\s*(\d+)", text)  # steppings may be ranges ('5-7') or lists
    return int(m[1]) if m else None


class FileCpuMap:
    """libvirt's x86 CPU map read from its directory (x86_features.xml and one x86_<model>.xml per model)."""

    def __init__(self, directory: Path = DEFAULT_DIR) -> None:
        self.directory = directory
        self.where = f"libvirt's CPU map in {directory}"
        features = _parse(directory / "x86_features.xml")
        self._names = {f.get("name", "") for f in features.iter("feature")} | \
                      {a.get("name", "") for a in features.iter("alias")}
        self._names.discard("")
        self._raw: dict[str, ET.Element] = {}
        for path in sorted(directory.glob("x86_*.xml")):
            if path.name in ("x86_features.xml", "x86_vendors.xml"):
                continue
            for m in _parse(path).iter("model"):
                if m.get("name") and len(m):  # a definition (a bare <model name=.../> inside one is its base)
                    self._raw[m.get("name", "")] = m
        if not self._raw:
            raise CpuMapError(f"{directory}: no x86 CPU models found")
        self._models: dict[str, ModelInfo] = {}

    def names(self) -> list[str]:
        return sorted(self._raw)

    def knows(self, feature: str) -> bool:
        return feature in self._names

    def model(self, name: str) -> ModelInfo | None:
        if name not in self._raw:
            return None
        if name not in self._models:
            self._models[name] = self._resolve(name, ())
        return self._models[name]

    def _resolve(self, name: str, chain: tuple[str, ...]) -> ModelInfo:
        if name in chain:
            raise CpuMapError(f"{self.where}: model {name!r} is based on itself ({' -> '.join((*chain, name))})")
        el = self._raw.get(name)
        if el is None:
            raise CpuMapError(f"{self.where}: model {chain[-1]!r} is based on {name!r}, which is not defined")
        features: set[str] = set()
        vendor: Vendor | None = None
        signature = None
        for child in el:
            if child.tag == "model":
                base = self._resolve(child.get("name", ""), (*chain, name))
                features |= base.features
                vendor, signature = vendor or base.vendor, signature or base.signature
            elif child.tag == "feature" and child.get("removed") != "yes":
                features.add(child.get("name", ""))
            elif child.tag == "vendor":
                vendor = VENDORS.get(child.get("name", ""))
            elif child.tag == "signature" and signature is None:
                fam, mod = _int(child.get("family")), _int(child.get("model"))
                if fam is not None and mod is not None:
                    signature = (fam, mod, _int(child.get("stepping")))
            elif child.tag == "signatures" and signature is None:
                first = child.find("signature")
                if first is not None:
                    fam, mod = _int(first.get("family")), _int(first.get("model"))
                    if fam is not None and mod is not None:
                        signature = (fam, mod, _int(first.get("stepping")))
        features.discard("")
        return ModelInfo(name, vendor, signature, frozenset(features))
