"""How a model is run for profiling and tuning: its safetensors checkpoint read a tensor at
a time, block-by-block streaming and the stages built on it, block replay, decode steps,
calibration observers, and the model adapters that say where a family keeps all of these."""
