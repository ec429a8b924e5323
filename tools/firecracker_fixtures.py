"""Cut the register readings pvmit checks its catalog against out of Firecracker's CPU fingerprint files.

    python3 tools/firecracker_fixtures.py GIT_DIR COMMIT tests/fixtures/firecracker

GIT_DIR is a clone of firecracker-microvm/firecracker. Each fingerprint_<CPU>_6.18host.json under
tests/data/cpu_template_helper/ is a real host's guest CPU configuration as KVM gives it to a Firecracker guest
(CPUID as KVM_GET_SUPPORTED_CPUID and Firecracker's normalisation leave it, MSRs read from the vCPU). Only what the
catalog describes is kept: CPUID leaf 1 EAX (the identity), leaf 7 subleaves 0-2, 0x80000008 and 0x80000021, and
MSR 0x10a (IA32_ARCH_CAPABILITIES).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FILES = {  # fingerprint name -> catalog model
    "INTEL_CASCADELAKE": "cascadelake-sp",
    "INTEL_ICELAKE": "icelake-sp",
    "INTEL_SAPPHIRE_RAPIDS": "sapphirerapids",
    "INTEL_GRANITE_RAPIDS": "graniterapids",
    "AMD_MILAN": "epyc-milan",
    "AMD_GENOA": "epyc-genoa",
}
LEAVES = {(0x1, 0), (0x7, 0), (0x7, 1), (0x7, 2), (0x80000008, 0), (0x80000021, 0)}
MSRS = {0x10A}


def main(git_dir: str, commit: str, out: str) -> None:
    for name, model in FILES.items():
        path = f"tests/data/cpu_template_helper/fingerprint_{name}_6.18host.json"
        doc = json.loads(subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], check=True,
                                        capture_output=True, text=True).stdout)
        cfg = doc["guest_cpu_config"]
        cpuid = {}
        for m in cfg["cpuid_modifiers"]:
            leaf, sub = int(m["leaf"], 16), int(m["subleaf"], 16)
            if (leaf, sub) in LEAVES:
                cpuid[f"{leaf:#x}.{sub}"] = {r["register"]: f"{int(r['bitmap'][2:], 2):#010x}"
                                             for r in m["modifiers"] if leaf != 1 or r["register"] == "eax"}
        msrs = {f"{int(m['addr'], 16):#x}": f"{int(m['bitmap'][2:], 2):#018x}" for m in cfg["msr_modifiers"]
                if int(m["addr"], 16) in MSRS}
        fixture = {
            "source": f"firecracker-microvm/firecracker {path}",
            "commit": commit,
            "what": "a real host's guest CPU configuration as KVM passes it to a Firecracker guest "
                    "(cpu-template-helper fingerprint)",
            "model": model,
            "kernel_version": doc["kernel_version"],
            "microcode_version": doc["microcode_version"],
            "cpuid": cpuid,
            "msr": msrs,
        }
        target = Path(out) / f"{model}.json"
        target.write_text(json.dumps(fixture, indent=2) + "\n", encoding="utf-8")
        print(target)


if __name__ == "__main__":
    main(*sys.argv[1:4])
