; Routines and data every pvmit guest program shares, pulled in with `.include "lib.s"` after a program's code
; (pvmit.guest.program expands it before assembling).

; #GP handler (vector 13): count it, skip the 2-byte RDMSR/WRMSR that faulted, drop the error code, return.
gp_handler:
    inc qword ptr [rip + gp_count]
    add qword ptr [rsp + 8], 2
    add rsp, 8
    iretq

; install_idt: an IDT whose only gate is gp_handler at vector 13
install_idt:
    lea rax, [rip + gp_handler]
    lea rbx, [rip + idt + 208]  ; vector 13 * 16 bytes
    mov word ptr [rbx], ax
    mov word ptr [rbx + 2], 8   ; the 64-bit code segment
    mov word ptr [rbx + 4], 0x8e00   ; present interrupt gate
    shr rax, 16
    mov word ptr [rbx + 6], ax
    shr rax, 16
    mov dword ptr [rbx + 8], eax
    mov dword ptr [rbx + 12], 0
    lea rax, [rip + idt]
    mov qword ptr [rip + idtr + 2], rax
    lidt [rip + idtr]
    ret

; puts: rsi = zero-terminated string, written to COM1
puts:
    push rax
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
    pop rax
    ret

; puthex: rax in hex, "0x" and no leading zeros; rax is kept
puthex:
    push rax
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
    pop rax
    ret

; newline: a line feed to COM1; every register is kept
newline:
    push rax
    push rdx
    mov dx, 0x3f8
    mov al, 10
    out dx, al
    pop rdx
    pop rax
    ret

    .align 8
gp_count: .quad 0
idtr: .word 223
    .quad 0
    .align 16
idt: .space 224
