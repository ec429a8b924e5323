; A guest that keeps working across a migration: it reports its mitigations once, then counts for ever,
; re-reading IA32_SPEC_CTRL on every iteration and printing a heartbeat line every so often.
;
; Entry (set by the VMM): rdi = iterations between heartbeats, rsi = request bits to write, rdx = the CTRL MSR
; index of the interface the VMM offers (0: report nothing), rsp = a stack.
; The heartbeat "guest: count 0x... spec_ctrl 0x... gp 0x..." lets a test check that counting continues on the
; destination exactly where it stopped on the source: the count is kept in memory, which the migration carries.

entry:
    mov r15, rdi
    call install_idt
    test edx, edx
    jz counting
    mov ecx, edx
    mov eax, esi
    xor edx, edx
    wrmsr                       ; report the mitigations in use (a #GP is counted by the handler)
counting:
    lea rsi, [rip + s_start]
    call puts
outer:
    mov r14, r15
inner:
    inc qword ptr [rip + count]
    mov ecx, 0x48
    rdmsr                       ; IA32_SPEC_CTRL as the guest reads it
    mov dword ptr [rip + spec], eax
    dec r14
    jnz inner
    lea rsi, [rip + s_count]
    call puts
    mov rax, qword ptr [rip + count]
    call puthex
    lea rsi, [rip + s_spec]
    call puts
    mov eax, dword ptr [rip + spec]
    call puthex
    lea rsi, [rip + s_gp]
    call puts
    mov rax, qword ptr [rip + gp_count]
    call puthex
    call newline
    jmp outer

.include "lib.s"  ; gp_handler, install_idt, puts, puthex, newline and their data

s_start: .asciz "guest: counting\n"
s_count: .asciz "guest: count "
s_spec: .asciz " spec_ctrl "
s_gp: .asciz " gp "
    .align 8
count: .quad 0
spec: .quad 0
