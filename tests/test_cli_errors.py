"""What the command line prints when a run fails: one line naming what failed and why (no Ray)."""

import errno

from anyflow_ray import cli
from anyflow_ray.cli import describe_failure, main


class LearnerGroupError(RuntimeError):  # the group's error as the CLI sees it (by name: no Ray imported here)
    def __init__(self, message, cause=None):
        super().__init__(message)
        self.cause = cause


def test_runtime_failures_are_one_line_with_the_traceback_kept(tmp_path, capsys, monkeypatch):
    ray_death = ("learner rank 1 died during 'train_step': The actor died unexpectedly before finishing this task.\n"
                 "\tclass_name: LearnerWorker\n\tactor_id: 4e5f\n\tpid: 8123\n" + "\tdetail\n" * 40)
    cases = {
        "disk full": (OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-000004"),
                      "No space left on device: '/runs/x/checkpoints/step-000004' (the disk is full"),
        "read-only": (OSError(errno.EROFS, "Read-only file system", "/runs/x/config.yaml"), "read-only: choose another"),
        "dead rank": (LearnerGroupError(ray_death), "learner rank 1 died during 'train_step': The actor died"),
        "nan": (LearnerGroupError("learner rank 0 failed in 'train_step': FloatingPointError: rank 0: non-finite "
                                  "loss nan at step 3", FloatingPointError("rank 0: non-finite loss nan at step 3")),
                "FloatingPointError: rank 0: non-finite loss nan at step 3"),
        "bug": (KeyError("weights"), "KeyError: 'weights'"),
    }
    for name, (err, expected) in cases.items():
        def fail(args, err=err):
            args.output_dir = str(tmp_path / "run")
            raise err
        monkeypatch.setattr(cli, "_run_command", fail)
        assert main(["teacher"]) == cli.EXIT_RUNTIME, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("anyflow-ray teacher: ") and expected in lines[0], (name, lines)
        assert len(lines[0]) < cli.LINE_LIMIT + 200
        trace = lines[0].rsplit("(traceback: ", 1)[1].split(";")[0]
        assert trace.startswith(str(tmp_path / "run" / "logs")) and "Traceback" in open(trace).read()
    assert describe_failure(OSError(errno.EACCES, "Permission denied", "/x")).endswith("choose another run.output_dir)")
