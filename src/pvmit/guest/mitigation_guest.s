; pvmit's test guest: what a guest kernel does with the mitigation-reporting interface, in 64-bit long mode.
;
; Entry (set by the VMM):  rdi = the software mitigations this guest uses (MITIGATION_CTRL layout:
;   bit 0 short BHB-clearing sequence, bit 1 retpoline); rsi = the IA32_SPEC_CTRL value it writes (trying to
;   clear forced bits); rsp = a stack. Paging, GDT and the 64-bit code segment are already set up.
; Shown LONG_BHB_NEEDED (pvmit's proposal, docs/interface.md section 9) it runs the long BHB-clearing loop and stops
; reporting the short one, as a guest that honours the bit would; it reads the pool description (section 10) where
; one is offered, checks it is read-only and ends where POOL_INFO says, and runs the loop it chose once.
; It reports every step as a text line on the serial port (0x3f8), installs its own #GP handler, checks what it
; reads back, prints "RESULT PASS" or "RESULT FAIL n", and halts.
; Register use: r15 uses, r14 the SPEC_CTRL value to write, r13 the CTRL MSR index, r12 the enumerated bits,
; r11 1 when the CTRL register is the kvm form (request bits in the low half), rbx/rbp scratch.
; Kept small: every instruction is emulated (about 500 ns) on the software KVM this runs on.

entry:
    mov r15, rdi
    mov r14, rsi
    call install_idt
    lea rsi, [rip + s_hello]
    call puts

; --- who am I: CPUID vendor and signature --------------------------------------------------------------------
    xor eax, eax
    xor ecx, ecx
    cpuid
    mov dword ptr [rip + vendor], ebx
    mov dword ptr [rip + vendor + 4], edx
    mov dword ptr [rip + vendor + 8], ecx
    lea rsi, [rip + s_vendor]
    call puts
    lea rsi, [rip + vendor]
    call puts
    mov eax, 1
    xor ecx, ecx
    cpuid
    lea rsi, [rip + s_sig]
    call puts
    call puthex
    call newline

; --- speculation enumeration: CPUID.(7,0).EDX and IA32_ARCH_CAPABILITIES ---------------------------------------
    mov eax, 7
    xor ecx, ecx
    cpuid
    mov dword ptr [rip + cpuid7edx], edx
    lea rsi, [rip + s_c7]
    call puts
    mov eax, edx
    call puthex
    call newline
    mov qword ptr [rip + archcaps], 0
    bt dword ptr [rip + cpuid7edx], 29
    jc read_archcaps
    ; Not enumerated. A guest kernel would stop here; this test guest probes with a #GP-safe RDMSR, because some
    ; KVM builds replace CPUID leaf 7 with the host's and so hide what the VMM set there.
    lea rsi, [rip + s_probe_arch]
    call puts
read_archcaps:
    mov ecx, 0x10a
    call rdmsr_safe
    jc no_archcaps
    mov qword ptr [rip + archcaps], rax
    lea rsi, [rip + s_arch]
    call puts
    call puthex
    call newline
    jmp find_interface
no_archcaps:
    lea rsi, [rip + s_noarch]
    call puts

; --- find the interface: neutral signature leaf, then KVM's feature bit, then Intel's ARCH_CAPABILITIES[63] -----
find_interface:
    mov ebp, 0x40000000
scan:
    mov eax, ebp
    xor ecx, ecx
    cpuid
    cmp ebx, 0x74726956        ; "Virt"
    jne scan_next
    cmp ecx, 0x6974694d        ; "Miti"
    jne scan_next
    cmp edx, 0x6c744367        ; "gCtl"
    jne scan_next
    lea eax, [rbp + 1]
    xor ecx, ecx
    cpuid
    mov r13d, ebx              ; CTRL MSR index
    mov r12d, ecx              ; supported request bits
    and edx, 1                 ; flags: LONG_BHB_NEEDED
    mov byte ptr [rip + long_bhb], dl
    mov eax, ebp
    xor ecx, ecx
    cpuid
    lea ecx, [rbp + 2]
    cmp eax, ecx               ; version 2 has leaf base+2: the pool description's POOL_INFO index
    jb neutral_done
    mov eax, ecx
    xor ecx, ecx
    cpuid
    mov dword ptr [rip + pool_msr], eax
neutral_done:
    xor r11d, r11d
    lea rsi, [rip + s_neutral]
    call puts
    jmp found
scan_next:
    add ebp, 0x100
    cmp ebp, 0x40010000
    jb scan

    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    cmp ebx, 0x4b4d564b        ; "KVMK"
    jne try_intel
    cmp ecx, 0x564b4d56        ; "VMKV"
    jne try_intel
    cmp edx, 0x4d              ; "M\0\0\0"
    jne try_intel
    mov eax, 0x40000001
    xor ecx, ecx
    cpuid
    bt eax, 30                 ; pvmit's KVM-style feature bit
    jnc try_intel
    bt edx, 30                 ; KVM hints: LONG_BHB_NEEDED
    setc byte ptr [rip + long_bhb]
    bt eax, 29                 ; the pool description at 0x4b564d81
    jnc kvm_no_pool
    mov dword ptr [rip + pool_msr], 0x4b564d81
kvm_no_pool:
    mov r13d, 0x4b564d80
    mov ecx, r13d
    call rdmsr_safe
    jc try_intel
    shr rax, 32
    mov r12, rax
    mov r11d, 1
    lea rsi, [rip + s_kvm]
    call puts
    jmp found

try_intel:
    mov rax, qword ptr [rip + archcaps]
    bt rax, 63                 ; ARCH_CAP_VIRTUAL_ENUM
    jnc no_interface
    mov ecx, 0x50000000
    call rdmsr_safe
    jc no_interface
    test al, 1                 ; MITIGATION_CTRL_SUPPORT
    jz no_interface
    bt eax, 1                  ; LONG_BHB_NEEDED (proposed)
    setc byte ptr [rip + long_bhb]
    bt eax, 2                  ; the pool description at 0x50000010 (proposed)
    jnc intel_no_pool
    mov dword ptr [rip + pool_msr], 0x50000010
intel_no_pool:
    mov ecx, 0x50000001
    call rdmsr_safe
    jc no_interface
    mov r12, rax
    mov r13d, 0x50000002
    xor r11d, r11d
    lea rsi, [rip + s_intel]
    call puts
    call print_found
    ; the RFC's read-only registers: a write must #GP and leave the value alone
    mov ecx, 0x50000001
    xor eax, eax
    xor edx, edx
    call wrmsr_expect_gp
    mov ecx, 0x50000001
    call rdmsr_safe
    cmp rax, r12
    je requests
    call fail
    jmp requests

no_interface:
    lea rsi, [rip + s_none]
    call puts
    jmp spec_ctrl

found:
    call print_found

; --- report what this kernel relies on (only what the VMM enumerates) and read it back -------------------------
requests:
    cmp byte ptr [rip + long_bhb], 0
    je requests_go
    lea rsi, [rip + s_long]
    call puts
    and r15, -2                ; the long loop runs instead: the short one is not in use
requests_go:
    mov rbx, r15
    and rbx, r12
    cmp rbx, r15
    je report
    lea rsi, [rip + s_unsupported]
    call puts
    mov rax, r15
    call puthex
    call newline
report:
    lea rsi, [rip + s_write]
    call puts
    mov rax, rbx
    call puthex
    call newline
    mov ecx, r13d
    mov eax, ebx
    xor edx, edx
    test r11d, r11d
    jz report_write
    mov edx, r12d              ; kvm form: write back the read-only high half as read
report_write:
    call wrmsr_safe
    jnc report_read
    call fail
report_read:
    mov ecx, r13d
    call rdmsr_safe
    mov eax, eax               ; the request bits are the low half in every form
    lea rsi, [rip + s_read]
    call puts
    call puthex
    call newline
    cmp rax, rbx
    je reserved
    call fail
reserved:
    ; a reserved bit must raise #GP and leave the value alone
    mov ecx, r13d
    xor eax, eax
    mov edx, 0x80000000
    call wrmsr_expect_gp
    mov ecx, r13d
    call rdmsr_safe
    mov eax, eax
    cmp rax, rbx
    je spec_ctrl
    call fail

; --- IA32_SPEC_CTRL: try to clear what the VMM forces, and read back our own value ------------------------------
spec_ctrl:
    bt dword ptr [rip + cpuid7edx], 26
    jc have_spec_ctrl
    mov eax, 0x80000008
    xor ecx, ecx
    cpuid
    bt ebx, 14                 ; AMD IBRS
    jc have_spec_ctrl
    lea rsi, [rip + s_probe_spec]  ; as for IA32_ARCH_CAPABILITIES above: probe, #GP-safe
    call puts
have_spec_ctrl:
    mov ecx, 0x48
    call rdmsr_safe
    jnc spec_readable
    lea rsi, [rip + s_nospec]
    call puts
    jmp pool_desc
spec_readable:
    lea rsi, [rip + s_spec_before]
    call puts
    call puthex
    call newline
    mov ecx, 0x48
    mov rax, r14
    mov rdx, r14
    shr rdx, 32
    call wrmsr_safe
    jnc spec_written
    call fail
spec_written:
    mov ecx, 0x48
    call rdmsr_safe
    lea rsi, [rip + s_spec_after]
    call puts
    call puthex
    call newline
    cmp rax, r14
    je pool_desc
    call fail

; --- the pool description: POOL_INFO, each entry, read-only, #GP past the count -----------------------------------
pool_desc:
    mov ecx, dword ptr [rip + pool_msr]
    test ecx, ecx
    jz bhb
    call rdmsr_safe
    jnc pool_info_read
    call fail
    jmp bhb
pool_info_read:
    mov qword ptr [rip + pool_info], rax
    lea rsi, [rip + s_pool]
    call puts
    call puthex
    call newline
    mov ecx, dword ptr [rip + pool_msr]
    xor eax, eax
    xor edx, edx
    call wrmsr_expect_gp
    movzx ebx, byte ptr [rip + pool_info]
    xor ebp, ebp
pool_loop:
    cmp ebp, ebx
    jae pool_past
    mov ecx, dword ptr [rip + pool_msr]
    lea ecx, [rcx + rbp + 1]
    call rdmsr_safe
    jnc pool_entry
    call fail
pool_entry:
    lea rsi, [rip + s_entry]
    call puts
    call puthex
    call newline
    mov ecx, dword ptr [rip + pool_msr]
    lea ecx, [rcx + rbp + 1]
    mov rdx, rax
    shr rdx, 32
    call wrmsr_expect_gp       ; entries are read-only too
    inc ebp
    jmp pool_loop
pool_past:
    cmp ebx, 32                ; the block holds 32 entries: past a shorter count, the next one raises #GP
    jae bhb
    mov ecx, dword ptr [rip + pool_msr]
    lea ecx, [rcx + rbx + 1]
    call rdmsr_safe
    jc pool_past_gp
    call fail
    jmp bhb
pool_past_gp:
    lea rsi, [rip + s_gp]
    call puts

; --- clear the branch history once, with the loop this guest chose --------------------------------------------
bhb:
    cmp byte ptr [rip + long_bhb], 0
    jne bhb_long
    mov ecx, 5
    mov r8d, 5
    lea rsi, [rip + s_bhb_short]
    jmp bhb_run
bhb_long:
    mov ecx, 12
    mov r8d, 7
    lea rsi, [rip + s_bhb_long]
bhb_run:
    call clear_bhb
    call puts

done:
    mov rax, qword ptr [rip + failures]
    test rax, rax
    jnz result_fail
    lea rsi, [rip + s_pass]
    call puts
    jmp halt
result_fail:
    lea rsi, [rip + s_fail]
    call puts
    call puthex
    call newline
halt:
    hlt
    jmp halt

; --- helpers -------------------------------------------------------------------------------------------------
; rdmsr_safe: ecx = index -> rax = value, CF=1 if it raised #GP
rdmsr_safe:
    mov qword ptr [rip + gp_count], 0
    xor eax, eax
    xor edx, edx
    rdmsr
    shl rdx, 32
    or rax, rdx
    cmp qword ptr [rip + gp_count], 1
    cmc
    ret

; wrmsr_safe: ecx = index, edx:eax = value -> CF=1 if it raised #GP
wrmsr_safe:
    mov qword ptr [rip + gp_count], 0
    wrmsr
    cmp qword ptr [rip + gp_count], 1
    cmc
    ret

; wrmsr_expect_gp: as wrmsr_safe, counting a failure if no #GP happened
wrmsr_expect_gp:
    call wrmsr_safe
    jc gp_ok
    call fail
    ret
gp_ok:
    lea rsi, [rip + s_gp]
    call puts
    ret

print_found:
    lea rsi, [rip + s_msr]
    call puts
    mov eax, r13d
    call puthex
    lea rsi, [rip + s_enum]
    call puts
    mov rax, r12
    call puthex
    jmp newline

fail:
    inc qword ptr [rip + failures]
    lea rsi, [rip + s_check]
    call puts
    ret

.include "lib.s"  ; gp_handler, install_idt, puts, puthex, newline and their data
.include "bhb.s"  ; clear_bhb

; --- data ----------------------------------------------------------------------------------------------------
s_hello: .asciz "guest: booted in long mode\n"
s_vendor: .asciz "guest: cpuid vendor "
s_sig: .asciz "\nguest: cpuid signature "
s_c7: .asciz "guest: cpuid.7.0.edx "
s_arch: .asciz "guest: ia32_arch_capabilities "
s_noarch: .asciz "guest: ia32_arch_capabilities #GP: not available\n"
s_neutral: .asciz "guest: interface neutral (signature VirtMitigCtl)"
s_kvm: .asciz "guest: interface kvm (cpuid 0x40000001 bit 30)"
s_intel: .asciz "guest: interface intel (arch_capabilities bit 63)"
s_none: .asciz "guest: interface none offered\n"
s_msr: .asciz " ctrl_msr "
s_enum: .asciz " enum "
s_unsupported: .asciz "guest: cannot report unsupported mitigations, wanted "
s_write: .asciz "guest: mitigation_ctrl write "
s_read: .asciz "guest: mitigation_ctrl read "
s_gp: .asciz "guest: #GP as expected\n"
s_check: .asciz "guest: CHECK FAILED\n"
s_nospec: .asciz "guest: ia32_spec_ctrl #GP: not available\n"
s_probe_spec: .asciz "guest: ia32_spec_ctrl not in cpuid, probing\n"
s_probe_arch: .asciz "guest: ia32_arch_capabilities not in cpuid.7.0.edx, probing\n"
s_spec_before: .asciz "guest: ia32_spec_ctrl read "
s_spec_after: .asciz "guest: ia32_spec_ctrl after write, read "
s_pass: .asciz "guest: RESULT PASS\n"
s_fail: .asciz "guest: RESULT FAIL "
s_long: .asciz "guest: LONG_BHB_NEEDED shown: the long loop runs, the short one is not reported\n"
s_pool: .asciz "guest: pool info "
s_entry: .asciz "guest: pool entry "
s_bhb_short: .asciz "guest: bhb loop short (5x5)\n"
s_bhb_long: .asciz "guest: bhb loop long (12x7)\n"
    .align 8
long_bhb: .quad 0
pool_msr: .quad 0
pool_info: .quad 0
vendor: .space 16
cpuid7edx: .quad 0
archcaps: .quad 0
failures: .quad 0
