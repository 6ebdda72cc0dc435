"""Where images come from (sources), how they are augmented on the device (augment), and
how batches reach the step (pipeline: on the device, or streamed by Grain)."""
