"""The bundled demo model's training: the synthetic task mix and its held-out split (demo_tasks), the
training rows (train_rows), the PyTorch trainer (train_demo, the `train` extra), the multiple-choice task
(mc_task, tasks/) and the quality yardstick's scoring (yardstick). training/README.md says how the bundled
model is made. Nothing here is imported by the runtime (illada_mlx) or the converter."""
