from semi_llie.cli import main

raise SystemExit(main())
