from onnx_udfc.cli import main

raise SystemExit(main())
