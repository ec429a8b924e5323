; uint64_t bhb_calls(uint64_t n, uint32_t outer, uint32_t inner): call clear_bhb (guest/bhb.s, appended when this
; stub is assembled) n times, n >= 1, so that a Python caller times many calls with one foreign call.
; System V AMD64: rdi = n, esi = outer, edx = inner; rbx is callee-saved and used here, so it is saved.
    push rbx
    mov rbx, rdi
bhb_calls_loop:
    mov ecx, esi
    mov r8d, edx
    call clear_bhb
    dec rbx
    jnz bhb_calls_loop
    pop rbx
    ret
