"""A VMM as a long-running process (control socket, migration in and out), and driving such processes from outside.

Above `migration` and `vmm`: it is where the two meet.
"""
