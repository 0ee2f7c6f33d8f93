"""The Ray-aware layer: Train launches (and later Tune and Jobs). Nothing below it imports Ray."""
