"""SiDP's weight pool: who owns which layer's pooled part, and how the others borrow it.

Imports nothing from the engine: any engine can drive it through the decoder's MLP seam.
"""
