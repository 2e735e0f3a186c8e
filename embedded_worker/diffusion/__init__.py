"""The device side: models, the denoising loop we own, the queue and the device workers."""
