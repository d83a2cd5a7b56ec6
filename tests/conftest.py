import sys
from pathlib import Path

# tests/ on sys.path so tests can `import helpers` and `import synthetic`
sys.path.insert(0, str(Path(__file__).resolve().parent))
