from fastner.bench.cli import main

raise SystemExit(main())
