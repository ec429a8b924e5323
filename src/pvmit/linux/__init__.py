"""What Linux guest kernels choose and print for Spectre v2 and BHI."""
