"""The numerical core: pure tensor functions with no ``nn.Module`` and no state.

Everything above (layers, model tools, the distributed layer, the planned Keras front-end) builds on these.
"""
