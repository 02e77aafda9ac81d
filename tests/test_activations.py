import sys
def test_probe():
    print([k for k in sys.modules if 'conftest' in k])
    from conftest import eps, using_threads
    print(eps, using_threads)
