"""The parts of libvirt's XML pvmit reads: a host's CPU (capabilities) and a domain's CPU, type and metadata.

Pure: text in, dataclasses out; anything malformed raises `XmlError` naming what is wrong. Elements pvmit does not
use are ignored, so any libvirt version's XML parses.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

MAX_XML = 16 << 20
"""Domain and capabilities XML are a few KiB; anything over this is refused rather than parsed."""

ENABLING = ("require", "force")
DISABLING = ("disable", "forbid")


class XmlError(ValueError):
    """The XML is not what libvirt writes; the message says what is wrong."""


def parse_xml(text: str | bytes, what: str) -> ET.Element:
    if len(text) > MAX_XML:
        raise XmlError(f"{what}: {len(text)} bytes is more than the {MAX_XML >> 20} MiB pvmit reads")
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise XmlError(f"{what}: not valid XML: {e}") from None


def _text(el: ET.Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    return el.text.strip() or None


def _num(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        raise XmlError(f"{what} {value!r} is not a number") from None


@dataclass(frozen=True)
class HostCpu:
    """The host CPU of `virsh capabilities`: model, vendor, signature and the features beyond the model."""

    arch: str | None
    model: str | None
    vendor: str | None  # libvirt's name: Intel, AMD, Hygon
    family: int | None
    model_number: int | None
    stepping: int | None
    microcode: int | None
    features: tuple[str, ...]
    xml: str  # the <cpu> element as libvirt wrote it (for expanding its model through the API)


def host_cpu(capabilities: str) -> HostCpu:
    root = parse_xml(capabilities, "capabilities")
    cpu = root.find("host/cpu")
    if root.tag != "capabilities" or cpu is None:
        raise XmlError("capabilities: no <host><cpu> element")
    sig = cpu.find("signature")
    mc = cpu.find("microcode")
    return HostCpu(
        _text(cpu.find("arch")), _text(cpu.find("model")), _text(cpu.find("vendor")),
        _num(sig.get("family"), "capabilities: signature family") if sig is not None else None,
        _num(sig.get("model"), "capabilities: signature model") if sig is not None else None,
        _num(sig.get("stepping"), "capabilities: signature stepping") if sig is not None else None,
        _num(mc.get("version"), "capabilities: microcode version") if mc is not None else None,
        tuple(f.get("name", "") for f in cpu.findall("feature")
              if f.get("name") and f.get("policy") not in DISABLING),
        ET.tostring(cpu, encoding="unicode"),
    )


@dataclass(frozen=True)
class GuestCpu:
    """A domain's `<cpu>`: how the guest CPU is chosen and which features differ from the model."""

    mode: str  # custom, host-model, host-passthrough, maximum; 'default' where the domain has no <cpu>
    model: str | None
    vendor: str | None
    check: str | None
    features: tuple[tuple[str, str], ...]  # (policy, name) in document order

    def with_policy(self, *policies: str) -> frozenset[str]:
        return frozenset(n for p, n in self.features if p in policies)


@dataclass(frozen=True)
class Domain:
    """What pvmit reads of a domain's XML."""

    name: str
    uuid: str | None
    virt_type: str  # 'kvm', or 'qemu' for TCG
    arch: str | None
    cpu: GuestCpu
    metadata: ET.Element | None  # the <metadata> element, for pvmit's own part of it (`pvmit.libvirt.record`)


def domain(xml: str) -> Domain:
    root = parse_xml(xml, "domain XML")
    if root.tag != "domain":
        raise XmlError(f"domain XML: root element is <{root.tag}>, not <domain>")
    name = _text(root.find("name"))
    if not name:
        raise XmlError("domain XML: no <name>")
    cpu_el = root.find("cpu")
    if cpu_el is None:
        cpu = GuestCpu("default", None, None, None, ())
    else:
        model_el = cpu_el.find("model")
        mode = cpu_el.get("mode") or ("custom" if model_el is not None else "default")
        feats = []
        for f in cpu_el.findall("feature"):
            n = f.get("name")
            if not n:
                raise XmlError(f"domain {name}: a <cpu><feature> has no name")
            feats.append((f.get("policy") or "require", n))
        cpu = GuestCpu(mode, _text(model_el), _text(cpu_el.find("vendor")), cpu_el.get("check"), tuple(feats))
    os_type = root.find("os/type")
    return Domain(name, _text(root.find("uuid")), root.get("type") or "kvm",
                  os_type.get("arch") if os_type is not None else None, cpu, root.find("metadata"))
