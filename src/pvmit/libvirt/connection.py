"""The thin layer over libvirt-python, the binding libvirt's project maintains (`pip install 'pvmit[libvirt]'`).

Everything here is a call into libvirt; what the answers mean is decided elsewhere, by pure code. Every libvirt
error becomes a `LibvirtError` naming the connection and what was asked.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import ModuleType
from typing import Any

from pvmit.errors import PvmitError
from pvmit.libvirt.agent import AgentError, Send
from pvmit.libvirt.cpumap import VENDORS, ModelInfo
from pvmit.libvirt.features import feature_map
from pvmit.libvirt.parse import DISABLING, XmlError, parse_xml
from pvmit.libvirt.record import NAMESPACE, PREFIX, Record, format_record

INSTALL_HINT = ("install the libvirt binding: pip install 'pvmit[libvirt]' (libvirt-python; it builds against "
                "libvirt's C library: on Debian apt-get install libvirt-dev pkg-config gcc python3-dev)")


class LibvirtError(PvmitError):
    """libvirt refused or failed; the message names the connection and the call."""


class LibvirtUnavailable(LibvirtError):
    """The binding is not installed."""


def binding() -> ModuleType:
    """The `libvirt` module, with libvirt's own printing of errors to stderr turned off (pvmit reports them)."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtUnavailable(f"the libvirt binding (libvirt-python) is not installed: {INSTALL_HINT}") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


def _features_of(cpu_xml: str) -> tuple[frozenset[str], str | None]:
    root = parse_xml(cpu_xml, "expanded CPU")
    names = frozenset(f.get("name", "") for f in root.findall("feature")
                      if f.get("name") and f.get("policy") not in DISABLING)
    vendor = root.findtext("vendor")
    return names, vendor.strip() if vendor else None


class Connection:
    """One libvirt connection (a host)."""

    def __init__(self, uri: str | None) -> None:
        self.lv = binding()
        try:
            self.conn: Any = self.lv.open(uri or None)
        except self.lv.libvirtError as e:
            raise LibvirtError(f"{uri or 'the default libvirt connection'}: cannot connect: {e}") from None
        self.uri = uri or str(self.call("connection URI", self.conn.getURI))
        self.cpumap = ConnectionCpuMap(self)

    def call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.lv.libvirtError as e:
            raise LibvirtError(f"{self.uri}: {what}: {e}") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except self.lv.libvirtError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def hostname(self) -> str:
        return str(self.call("hostname", self.conn.getHostname))

    @property
    def version(self) -> str:
        v = int(self.call("libvirt version", self.conn.getLibVersion))
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    def capabilities(self) -> str:
        return str(self.call("capabilities", self.conn.getCapabilities))

    def expand(self, cpu_xml: str) -> frozenset[str]:
        """Every feature of a host CPU (its model's and the rest), as the daemon's own CPU map expands it."""
        out = self.call("expand the host CPU", self.conn.baselineCPU, [cpu_xml],
                        self.lv.VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES)
        return _features_of(str(out))[0]

    def running_domains(self) -> list[Any]:
        doms = self.call("list domains", self.conn.listAllDomains, self.lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return sorted(doms, key=lambda d: d.name())

    def domain(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.lv.libvirtError as e:
            raise LibvirtError(f"{self.uri}: no domain {name!r}: {e}") from None

    def xml(self, dom: Any, migratable: bool = False) -> str:
        flags = self.lv.VIR_DOMAIN_XML_MIGRATABLE if migratable else 0
        return str(self.call(f"XML of domain {dom.name()}", dom.XMLDesc, flags))

    def agent(self, dom: Any, timeout: int) -> Send:
        """The guest agent of `dom` as a Send (see `pvmit.libvirt.agent`)."""
        try:
            import libvirt_qemu
        except ImportError:
            raise LibvirtUnavailable(f"libvirt_qemu (part of libvirt-python) is missing: {INSTALL_HINT}") from None

        def send(cmd: str) -> str:
            try:
                return str(libvirt_qemu.qemuAgentCommand(dom, cmd, timeout, 0))
            except self.lv.libvirtError as e:
                raise AgentError(str(e)) from None
        return send

    def write_record(self, dom: Any, record: Record) -> None:
        """pvmit's metadata element on `dom`, live and (for a persistent domain) in its configuration."""
        flags = self.lv.VIR_DOMAIN_AFFECT_LIVE
        if dom.isPersistent():
            flags |= self.lv.VIR_DOMAIN_AFFECT_CONFIG
        self.call(f"set metadata of domain {dom.name()}", dom.setMetadata, self.lv.VIR_DOMAIN_METADATA_ELEMENT,
                  format_record(record), PREFIX, NAMESPACE, flags)


class ConnectionCpuMap:
    """libvirt's CPU map as the daemon at the other end of a connection has it (`cpumap.CpuMap`)."""

    def __init__(self, c: Connection) -> None:
        self.c = c
        self.where = f"libvirt's CPU map at {c.uri}"
        self._models: dict[str, ModelInfo | None] = {}
        self._known: dict[str, bool] = {}
        self._vendors: dict[str, str] | None = None

    def _vendor_of(self, model: str) -> str | None:
        """libvirt lists each custom model's vendor in the domain capabilities (<model vendor='Intel'>)."""
        if self._vendors is None:
            self._vendors = {}
            try:
                root = parse_xml(str(self.c.conn.getDomainCapabilities()), "domain capabilities")
                for m in root.iterfind("cpu/mode[@name='custom']/model"):
                    if m.text and m.get("vendor"):
                        self._vendors[m.text.strip()] = m.get("vendor", "")
            except (self.c.lv.libvirtError, XmlError, ET.ParseError):
                pass  # no vendors known: identities come from the catalog, or are taken as Intel
        return self._vendors.get(model)

    def model(self, name: str) -> ModelInfo | None:
        if name not in self._models:
            try:
                out = self.c.conn.baselineCPU([f"<cpu><arch>x86_64</arch><model>{_esc(name)}</model></cpu>"],
                                              self.c.lv.VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES)
            except self.c.lv.libvirtError:
                self._models[name] = None
            else:
                features, vendor = _features_of(str(out))
                vendor = vendor or self._vendor_of(name)
                self._models[name] = ModelInfo(name, VENDORS.get(vendor or ""), None, features)
        return self._models[name]

    def knows(self, feature: str) -> bool:
        """Asked of the daemon: a CPU naming a feature it does not know is refused ('Unknown CPU feature')."""
        if feature not in self._known:
            try:
                self.c.conn.baselineCPU([f"<cpu><arch>x86_64</arch><model>qemu64</model>"
                                         f"<feature name='{_esc(feature)}'/></cpu>"], 0)
                self._known[feature] = True
            except self.c.lv.libvirtError:
                self._known[feature] = False
        return self._known[feature]

    def known_names(self) -> dict[str, bool]:
        """Which of pvmit's feature names this daemon knows."""
        return {f.name: self.knows(f.name) for f in feature_map().features}


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")
