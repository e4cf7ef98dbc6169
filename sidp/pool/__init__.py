"""SiDP's weight pool: who owns which layer's pooled parts, and how the others borrow them (map, WaS,
CaS, or auto's per-step choice between WaS and CaS).

Imports nothing from the engine: any engine can drive it through the decoder's `WeightPool` seam.
"""
