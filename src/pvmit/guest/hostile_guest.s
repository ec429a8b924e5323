; A hostile guest: it floods the interface with random values and pokes ports it has no business with.
;
; Entry: rdi = iterations, rsi = a non-zero seed, rdx = the CTRL MSR index of the offered form. Each iteration
; draws a 64-bit random number (xorshift64), picks an MSR from the table below or a random index in
; 0x50000000-0x5000ffff, writes a random
; value to it, reads it back, and every 8th iteration does an OUT and an IN on a random port. Every #GP is counted
; and survived. At the end it prints "guest: hostile done gp 0x..." and halts.

entry:
    mov r15, rdi                ; iterations left
    mov r14, rsi                ; xorshift state
    mov r13, rdx                ; the offered CTRL MSR
    call install_idt
    mov qword ptr [rip + msrs + 56], r13
hostile_loop:
    call random
    mov rbx, rax
    mov ecx, ebx
    and ecx, 7
    lea rdi, [rip + msrs]
    mov ecx, dword ptr [rdi + rcx * 8]
    test ecx, ecx
    jnz have_msr
    mov rcx, rbx
    shr rcx, 48
    or ecx, 0x50000000          ; a random index near the virtual MSRs (not one KVM gives meaning to)
have_msr:
    call random
    mov rdx, rax
    shr rdx, 32                 ; random high half
    bt ebx, 8
    jnc write_it
    call random                 ; a fresh draw: consecutive xorshift outputs are correlated bit by bit
    and eax, 0x443              ; half the time a plausible value: request bits, IBRS, RRSBA_DIS_S, BHI_DIS_S
    xor edx, edx
write_it:
    wrmsr
    rdmsr
    test r15b, 7
    jnz next
    call random
    mov edx, eax
    and edx, 0xffff
    out dx, al
    in al, dx
next:
    dec r15
    jnz hostile_loop
    lea rsi, [rip + s_done]
    call puts
    mov rax, qword ptr [rip + gp_count]
    call puthex
    call newline
halt:
    hlt
    jmp halt

; xorshift64: r14 -> r14, rax
random:
    mov rax, r14
    shl rax, 13
    xor r14, rax
    mov rax, r14
    shr rax, 7
    xor r14, rax
    mov rax, r14
    shl rax, 17
    xor r14, rax
    mov rax, r14
    ret

.include "lib.s"  ; gp_handler, install_idt, puts, puthex, newline and their data

s_done: .asciz "guest: hostile done gp "
    .align 8
; the MSRs it aims at (0 = a random index): the Intel virtual MSRs, pvmit's KVM-style MSR,
; IA32_ARCH_CAPABILITIES, IA32_SPEC_CTRL, IA32_PRED_CMD, and the offered CTRL MSR (filled in at entry)
msrs:
    .quad 0x50000000
    .quad 0x50000001
    .quad 0x50000002
    .quad 0x4b564d80
    .quad 0x10a
    .quad 0x48
    .quad 0
    .quad 0
