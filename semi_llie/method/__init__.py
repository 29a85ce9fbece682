"""Semi-LLIE's method parts besides the losses: the EMA teacher and the reliable bank (METHOD §3-4)."""
