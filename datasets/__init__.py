from datasets.mvtec import (MVTEC_OBJECTS, MVTEC_TEXTURES, Sample, available_categories,  # noqa: F401
                            iterate_batches, resolve_categories, test_samples, train_samples)
