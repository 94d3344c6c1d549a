"""Benchmarks: `python -m vattn_ray.bench <name> [args]` runs `vattn_ray.bench.<name>.main(args)`."""
