"""Print the fixed validation split of the 27 labelled cases (docs/model-card.md).

Drawn once, by seed, before any result of a new recipe was seen, from the 14 cases that the
shipped fold-0 model never trained on (its 4 held-out cases and the 10 of brats-labeled-extra),
so that a model fine-tuned from the shipped weights is scored on cases that no weights it
started from have seen. The other 20 cases are the training split.
"""

import argparse
from pathlib import Path

from tiramisu_brats import io
from tiramisu_brats.data import labelled_cases, split_cases

SEED = 20261202
N_VAL = 7
# The cases the model shipped before this split (fold 0 of 5 over brats-labeled) trained on,
# as its weights file's header recorded them ("trained_on").
FOLD0_TRAINED_ON = (
    "BraTS-GLI-00012-000,BraTS2021_00000,BraTS2021_00006,BraTS2021_00014,BraTS2021_00024,"
    "BraTS2021_00031,Brats17_2013_27_1,Brats17_TCIA_639_1,Brats18_2013_23_1,Brats18_2013_2_1,"
    "Brats18_TCIA02_606_1,Brats18_TCIA05_396_1,Brats18_TCIA10_628_1").split(",")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("data_root", nargs="?", type=Path, default=Path("../shared/data"),
                    help="the folder holding brats-labeled and brats-labeled-extra")
root = parser.parse_args().data_root
try:
    ids = list(labelled_cases(root))
except io.InputError as err:  # e.g. no such data root
    parser.error(str(err))
seen = set(FOLD0_TRAINED_ON)
unseen = [i for i in ids if i not in seen]
_, val = split_cases(unseen, val_fraction=N_VAL / len(unseen), seed=SEED)
train = [i for i in ids if i not in val]
print(f"{len(ids)} cases; {len(unseen)} never seen by the fold-0 model; seed {SEED}")
print("validation:", ",".join(val))
print("training:  ", ",".join(train))
