"""pvmit's element in a domain's `<metadata>`: what the guest relies on, as last read, and the VM's settings.

The migration hook runs on the destination without the guest and may not call back into libvirt, so whatever it
needs about the guest must be in the domain XML libvirt hands it. `pvmit libvirt record` puts it there (through
virDomainSetMetadata, live and persistent), and it travels with the domain on every migration:

    <metadata>
      <pvmit:pvmit xmlns:pvmit="urn:pvmit:libvirt:1">
        <pvmit:guest relies-on="retpoline" source="qemu-guest-agent" read-at="2026-01-02T03:04:05Z">
          <pvmit:spectre_v2>Mitigation: Retpolines; ...; BHI: Retpoline</pvmit:spectre_v2>
          <pvmit:cmdline>console=ttyS0 ...</pvmit:cmdline>
        </pvmit:guest>
        <pvmit:settings force-on="" force-off="" unreported="assume-worst"/>
      </pvmit:pvmit>
    </metadata>

`relies-on` holds pvmit's names (retpoline, bhb-short, comma-separated) or 'none'. A domain without the element has
never been read: the policy then judges it by its `unreported` setting, as it judges any guest that never reported.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from pvmit.derive import Mitigation
from pvmit.fleet.inventory import mitigations_label, parse_bits, parse_mitigations, parse_unreported
from pvmit.libvirt.parse import XmlError

NAMESPACE = "urn:pvmit:libvirt:1"
PREFIX = "pvmit"
ROOT = "pvmit"
_NS = f"{{{NAMESPACE}}}"


@dataclass(frozen=True)
class GuestReading:
    """What the guest's kernel relies on, how it was learned, and the lines it was decided from."""

    relies_on: frozenset[Mitigation]
    source: str  # 'qemu-guest-agent' or 'operator'
    read_at: str  # ISO 8601, UTC
    spectre_v2: str | None = None
    cmdline: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"relies_on": mitigations_label(self.relies_on), "source": self.source, "read_at": self.read_at,
                "spectre_v2": self.spectre_v2, "cmdline": self.cmdline}


@dataclass(frozen=True)
class Record:
    """pvmit's metadata of one domain; `settings` holds the inventory's setting columns as given (text)."""

    reading: GuestReading | None = None
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.reading is None and not self.settings


SETTINGS = {"force-on": "force_on", "force-off": "force_off", "unreported": "unreported"}
"""Attribute of <settings> -> the inventory column it fills."""


def parse_record(metadata: ET.Element | None, where: str) -> Record:
    """pvmit's element from a domain's <metadata> (an empty Record where there is none). XmlError names what is
    wrong: a record that cannot be read is an error, never taken as 'nothing recorded'."""
    if metadata is None:
        return Record()
    root = metadata.find(f"{_NS}{ROOT}")
    if root is None:
        return Record()
    reading = None
    g = root.find(f"{_NS}guest")
    if g is not None:
        text = g.get("relies-on")
        if text is None:
            raise XmlError(f"{where}: pvmit metadata: <guest> has no relies-on attribute")
        try:
            relied = parse_mitigations(text)
        except ValueError as e:
            raise XmlError(f"{where}: pvmit metadata: relies-on {text!r}: {e}") from None
        if relied is None:
            raise XmlError(f"{where}: pvmit metadata: relies-on must name mitigations or 'none', not {text!r}")

        def child(tag: str) -> str | None:
            el = g.find(f"{_NS}{tag}")
            return el.text.strip() if el is not None and el.text else None

        reading = GuestReading(relied, g.get("source") or "unknown", g.get("read-at") or "unknown",
                               child("spectre_v2"), child("cmdline"))
    settings: dict[str, str] = {}
    s = root.find(f"{_NS}settings")
    if s is not None:
        for attr, column in SETTINGS.items():
            value = (s.get(attr) or "").strip()
            if not value:
                continue
            try:
                (parse_unreported if column == "unreported" else parse_bits)(value)
            except ValueError as e:
                raise XmlError(f"{where}: pvmit metadata: settings {attr}: {e}") from None
            settings[column] = value
    return Record(reading, settings)


def format_record(record: Record) -> str:
    """The element given to virDomainSetMetadata (libvirt adds the namespace and prefix)."""
    root = ET.Element(ROOT)
    if record.reading is not None:
        r = record.reading
        g = ET.SubElement(root, "guest", {"relies-on": mitigations_label(r.relies_on), "source": r.source,
                                          "read-at": r.read_at})
        for tag, value in (("spectre_v2", r.spectre_v2), ("cmdline", r.cmdline)):
            if value is not None:
                ET.SubElement(g, tag).text = value
    if record.settings:
        ET.SubElement(root, "settings", {attr: record.settings[col] for attr, col in SETTINGS.items()
                                         if col in record.settings})
    return ET.tostring(root, encoding="unicode")
