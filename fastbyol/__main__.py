from fastbyol.cli import main

raise SystemExit(main())
