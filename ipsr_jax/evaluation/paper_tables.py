"""The paper's own rank-1 numbers (Tables 1-4, in %), keyed like our results.

Copied from the paper's text. Its typos are corrected and marked: Table 2's SHI row prints
'0.68.05%' and '0.69.2%' for 16x14 and 18x16, read here as 68.05 and 69.2. Table 3 labels the far
SCface distance '4.7m'; the database's far distance is 4.20 m, our key '4.2m'. A '-' in the paper
is None. The row 'Ours' is the paper's method; `PAPER_METHOD` says which of our methods it
corresponds to (SR alone for AR/LFW, concatenated bicubic+SR embeddings for SCface).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PaperTable:
  number: int
  caption: str
  columns: tuple[str, ...]                  # our condition keys, in the paper's column order
  column_labels: tuple[str, ...]            # as printed in the paper
  rows: dict[str, tuple[float | None, ...]]  # method as printed -> rank-1 % per column
  notes: tuple[str, ...] = ()


PAPER_TABLES: dict[str, PaperTable] = {
    'ar': PaperTable(
        number=1,
        caption='Comparison of Rank-1 correct match score on AR data set.',
        columns=('11x8', '16x12', '16x16', '21x15', '32x32'),
        column_labels=('11x8', '16x12', '16x16', '21x15', '32x32'),
        rows={
            'Bicubic': (3.0, 16.0, None, 59.0, None),
            'SRGAN [5]': (3.0, 8.0, None, 30.0, None),
            'LapSRN [27]': (4.0, 14.0, None, 37.0, None),
            'ScSR [28]': (3.0, 23.0, None, 37.0, None),
            'Ours': (17.0, 68.0, 76.0, 86.0, 100.0),
        }),
    'lfw': PaperTable(
        number=2,
        caption='Rank-1 identification rate (%) on LFW.',
        columns=('7x6', '14x12', '16x14', '18x16'),
        column_labels=('7x6', '14x12', '16x14', '18x16'),
        rows={
            'SHI [29]': (None, 66.16, 68.05, 69.2),
            'Bicubic': (0.23, 8.04, 13.78, 23.01),
            'EDSR32,256,0 (VGG-Face) [14]': (5.13, 28.68, 32.59, 36.84),
            'EDSR32,256,0.5 (VGG-Face) [14]': (9.31, 39.32, 38.93, 43.26),
            'EDSR32,256,0 (SFace) [14]': (5.91, 50.78, 56.19, 65.89),
            'EDSR32,256,0.5 (SFace) [14]': (14.91, 63.34, 63.78, 71.96),
            'Ours': (3.16, 56.97, 69.77, 78.72),
        },
        notes=("SHI's 16x14 and 18x16 cells are printed '0.68.05%' and '0.69.2%' in the paper: "
               'read as 68.05 and 69.2.',)),
    'scface_p1': PaperTable(
        number=3,
        caption=('Rank-1 identification rate (%) on SCface, high-resolution frontal faces as '
                 'gallery, faces from three standoff distances as probes.'),
        columns=('1.0m', '2.6m', '4.2m'),
        column_labels=('1m Camera', '2.6m Camera', '4.7m Camera'),
        rows={
            'SCface [22]': (6.18, 6.18, 1.82),
            'CLPM [31]': (3.08, 4.32, 3.46),
            'SSR [32]': (18.09, 13.2, 7.04),
            'CSCDN [33]': (18.97, 13.58, 6.99),
            'CCA [34]': (20.69, 14.85, 9.79),
            'DCA [35]': (25.53, 18.44, 12.19),
            'C-RSDA [36]': (18.46, 18.08, 15.77),
            'Centerloss [37]': (31.71, 20.80, 20.40),
            'LMSoftmax [26]': (18.00, 16.00, 14.00),
            'AMSoftmax [26]': (18.40, 20.80, 14.80),
            'L2softmax [26]': (16.80, 18.80, 9.20),
            'Ours': (96.44, 74.10, 9.70),
        },
        notes=("The paper labels the far distance '4.7m'; SCface's far cameras stand at 4.20 m "
               "(distance code 1), our column '4.2m'.",)),
    'scface_p2': PaperTable(
        number=4,
        caption=('Rank-1 identification rate (%) on SCface, 1m faces as gallery and 2.6m faces as '
                 'probes.'),
        columns=('2.6m',),
        column_labels=('1m - 2.6m Camera',),
        rows={
            'CLPM [31]': (29.12,),
            'CMFA [38]': (39.56,),
            'LMsoftmax [39]': (39.56,),
            'SDA [40]': (40.08,),
            'LMSoftmax [26]': (40.4,),
            'L2softmax [41]': (42.8,),
            'Coupled mapping method [42]': (43.24,),
            'AMSoftmax [26]': (46.8,),
            'LMCM [43]': (60.40,),
            'Centerloss [26]': (69.60,),
            'Ours': (76.89,),
        }),
}

# Which of our result methods each paper row corresponds to (rows not listed have no analogue).
PAPER_METHOD: dict[str, dict[str, str]] = {
    'ar': {'Ours': 'sr', 'Bicubic': 'bicubic'},
    'lfw': {'Ours': 'sr', 'Bicubic': 'bicubic'},
    'scface_p1': {'Ours': 'sr_concat'},
    'scface_p2': {'Ours': 'sr_concat'},
}


def paper_value(protocol: str, row: str, column: str) -> float | None:
  """The paper's rank-1 % for (protocol, printed row, our column key), None when absent."""
  table = PAPER_TABLES.get(protocol)
  if table is None or row not in table.rows or column not in table.columns:
    return None
  return table.rows[row][table.columns.index(column)]
