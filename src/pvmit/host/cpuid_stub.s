; void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4])   System V AMD64 calling convention:
; edi = leaf, esi = subleaf, rdx = out. rbx is callee-saved and CPUID writes it, so save it.
    push rbx
    mov r8, rdx
    mov eax, edi
    mov ecx, esi
    cpuid
    mov dword ptr [r8], eax
    mov dword ptr [r8 + 4], ebx
    mov dword ptr [r8 + 8], ecx
    mov dword ptr [r8 + 12], edx
    pop rbx
    ret
