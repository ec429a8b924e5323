; Benchmark guest: RDMSR of one MSR in a tight loop, then halt.
; Entry: rdi = MSR index, rsi = number of reads (at least 1).
    mov ecx, edi
read_loop:
    rdmsr
    dec rsi
    jnz read_loop
    hlt
