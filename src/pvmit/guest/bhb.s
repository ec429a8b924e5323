; clear_bhb: Linux's BHB-clearing sequence (arch/x86/entry/entry_64.S, clear_bhb_loop), with its two loop counts
; as arguments instead of constants, as the VMSCAPE/BHB series v11 makes them (patch 2, "x86/bhi: Make
; clear_bhb_loop() effective on newer CPUs", <20260422-vmscape-bhb-v11-2-b18e0cf32af4@linux.intel.com>):
;   ecx = outer count, r8d = inner count: 5 and 5 for the short sequence, 12 and 7 for the long one.
; Clobbers eax and ecx; keeps every other register. Included by the test guests (pvmit.guest.source_of) and by the
; host's benchmark stub (pvmit.bench.bhi), so the loop that is timed natively is the one the guest runs.
;
; The shape is Linux's: CALLs and RETs so that the Loop Stream Detector does not engage (entry_64.S: "CALLs/RETs are
; necessary to prevent Loop Stream Detector(LSD) from engaging and not clearing the branch history"), each RET in the
; upper half of a 64-byte line (the .skip of the ITS change: 27 bytes before the first CALL, and the 16 bytes the
; inner block takes before its RET here, where Linux loads the inner count with a 5-byte MOV), LFENCE at the end.
; Each outer iteration CALLs again without returning, so the RETs unwind outer + 1 frames at the end.
clear_bhb:
    push rbp
    mov rbp, rsp
    call clear_bhb_1
    jmp clear_bhb_5
    .align 64, 0xcc
    .space 27, 0xcc
clear_bhb_1:
    call clear_bhb_2
clear_bhb_ret1:
    ret
    .align 64, 0xcc
    .space 16, 0xcc
clear_bhb_2:
    mov eax, r8d
clear_bhb_3:
    jmp clear_bhb_4
    nop
clear_bhb_4:
    sub eax, 1
    jnz clear_bhb_3
    sub ecx, 1
    jnz clear_bhb_1
clear_bhb_ret2:
    ret
clear_bhb_5:
    lfence
    pop rbp
    ret
