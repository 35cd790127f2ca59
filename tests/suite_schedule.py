"""The suite's pytest-xdist schedule: which tests share a worker, and which groups start first
(tests/conftest.py applies it)."""

# Session fixtures that train: every test using one runs on the same pytest-xdist worker.
TRAINED_FIXTURES = ("vista3d_quick_run", "ensemble_members")
# The longest groups, longest first (measured on 2 loaded cores, in seconds: partial labels
# ~1000, training 1050, ensemble members and the GPU report's smoke run 820, notebooks 810, the
# default run's commands ~700, scale-out 520, VISTA3D 420, ...): pytest-xdist hands the groups to
# the workers in this order, and a long group started last keeps one worker busy while the other
# idles (a run ended with 15 minutes of one worker training partial labels alone).
LONGEST_FIRST = ("tests/test_partial_labels.py", "tests/test_training.py", "ensemble_members",
                 "tests/test_notebooks.py", "commands_as_typed:default_run",
                 "tests/test_scale_out.py", "vista3d_quick_run",
                 "commands_as_typed:phantom_recipes", "tests/test_installed_wheel.py",
                 "tests/test_bad_input_matrix.py", "commands_as_typed:vista3d",
                 "tests/inference/test_predict_resume.py", "tests/test_bundle_recipes.py",
                 "tests/test_run_checks.py", "commands_as_typed:quick")
