"""The deploy tier: deploy/compose.yaml brought up for real (deploy/test-deploy.sh).

It needs images built on this host (deploy/images/build.sh, minutes the first
time) and a compose tool that deploy/test.sh does not install, so it is a step
of its own: `bash deploy/test-deploy.sh`. A run over the whole of tests/
(deploy/test.sh) leaves it out; naming this folder or a file in it
(`pytest tests/deploy`), or RTM_DEPLOY_TESTS=1, runs it.
"""

from __future__ import annotations

from pathlib import Path

from tests.support import separate_tier

pytest_ignore_collect = separate_tier(Path(__file__).resolve().parent, "RTM_DEPLOY_TESTS")
