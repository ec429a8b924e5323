; A guest kernel's entry path, repeated: what each BHI policy costs per kernel entry (`pvmit bench bhi`).
;
; Entry (set by the VMM): rdi = kernel entries (at least 1); rsi = the BHB-clearing loop's outer count (0: no loop),
;   rdx = its inner count; rcx = 0, or 1 to write IA32_SPEC_CTRL twice per entry (IBRS set on entry and cleared on
;   exit, as Linux's IBRS_ENTER / IBRS_EXIT do with spectre_v2=ibrs, arch/x86/entry/calling.h); r8 = the CTRL MSR to
;   report to (0: report nothing, an unenlightened guest), r9 = the request bits to report.
; Prints the line "S" before the first entry and "E" after the last (the VMM timestamps both), then the TSC ticks
; the entries took, and halts. Nothing else happens between the two markers: every exit there is the policy's.

entry:
    mov r15, rdi
    mov r14, rsi
    mov r13, rdx
    mov r12, rcx
    mov r11, r8
    mov r10, r9
    call install_idt            ; uses rax and rbx
    test r11, r11
    jz start
    mov ecx, r11d
    mov eax, r10d
    xor edx, edx
    wrmsr                       ; report (a #GP is counted by the handler)
start:
    lea rsi, [rip + s_start]
    call puts
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rbp, rax
kernel_entry:
    test r12, r12
    jz clear
    mov ecx, 0x48
    mov eax, 1
    xor edx, edx
    wrmsr                       ; IA32_SPEC_CTRL.IBRS on entry
clear:
    test r14, r14
    jz kernel_exit
    mov ecx, r14d
    mov r8d, r13d
    call clear_bhb
kernel_exit:
    test r12, r12
    jz next_entry
    mov ecx, 0x48
    xor eax, eax
    xor edx, edx
    wrmsr                       ; and back on exit
next_entry:
    dec r15
    jnz kernel_entry
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, rbp
    mov rbx, rax
    lea rsi, [rip + s_end]
    call puts
    lea rsi, [rip + s_tsc]
    call puts
    mov rax, rbx
    call puthex
    call newline
halt:
    hlt
    jmp halt

.include "lib.s"  ; gp_handler, install_idt, puts, puthex, newline and their data
.include "bhb.s"  ; clear_bhb

s_start: .asciz "S\n"
s_end: .asciz "E\n"
s_tsc: .asciz "guest: tsc "
