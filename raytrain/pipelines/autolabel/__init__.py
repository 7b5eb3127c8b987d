"""3D open-vocabulary auto-labeling of LiDAR sequences (spec autolabel3d.md, after UP-VL): one module per stage."""
