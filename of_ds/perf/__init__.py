"""Measurement and projection: the dry run's memory plan (`memory`), step timing (`bench_step`, `step_profile`),
bytes and FLOPs per operator (`traffic`, `compiled_traffic`), device peaks (`peak`), converter throughput
(`convert_bench`). Built on the model and the engines; the trainer uses the memory plan and the peak table."""
