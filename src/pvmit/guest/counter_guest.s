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
    mov al, 10
    mov dx, 0x3f8
    out dx, al
    jmp outer

; #GP handler (vector 13): count it, skip the 2-byte RDMSR/WRMSR that faulted, drop the error code, return.
gp_handler:
    inc qword ptr [rip + gp_count]
    add qword ptr [rsp + 8], 2
    add rsp, 8
    iretq

install_idt:
    lea rax, [rip + gp_handler]
    lea rbx, [rip + idt + 208]
    mov word ptr [rbx], ax
    mov word ptr [rbx + 2], 8
    mov word ptr [rbx + 4], 0x8e00
    shr rax, 16
    mov word ptr [rbx + 6], ax
    shr rax, 16
    mov dword ptr [rbx + 8], eax
    mov dword ptr [rbx + 12], 0
    lea rax, [rip + idt]
    mov qword ptr [rip + idtr + 2], rax
    lidt [rip + idtr]
    ret

puts:
    push rdx
    mov dx, 0x3f8
puts_loop:
    lodsb
    test al, al
    jz puts_end
    out dx, al
    jmp puts_loop
puts_end:
    pop rdx
    ret

; puthex: rax in hex, "0x" and no leading zeros
puthex:
    push rbx
    push rcx
    push rdx
    push rbp
    mov rbx, rax
    mov dx, 0x3f8
    mov al, 0x30
    out dx, al
    mov al, 0x78
    out dx, al
    mov ecx, 60
    xor ebp, ebp
puthex_loop:
    mov rax, rbx
    shr rax, cl
    and eax, 15
    jnz puthex_digit
    test ebp, ebp
    jnz puthex_digit
    test ecx, ecx
    jnz puthex_next
puthex_digit:
    mov ebp, 1
    cmp al, 10
    jb puthex_dec
    add al, 0x27
puthex_dec:
    add al, 0x30
    out dx, al
puthex_next:
    sub ecx, 4
    jns puthex_loop
    pop rbp
    pop rdx
    pop rcx
    pop rbx
    ret

s_start: .asciz "guest: counting\n"
s_count: .asciz "guest: count "
s_spec: .asciz " spec_ctrl "
s_gp: .asciz " gp "
    .align 8
count: .quad 0
spec: .quad 0
gp_count: .quad 0
idtr: .word 223
    .quad 0
    .align 16
idt: .space 224
