"""``python -m wan_train``: see :func:`wan_train.main`."""

from wan_train import main

raise SystemExit(main())
