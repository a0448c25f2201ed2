"""New studies from a PACS and results back to it (DICOMweb and DIMSE).

- ``config``: the ``pacs:`` settings section (credentials only from the environment);
- ``source``: what every PACS client offers (search, retrieve, store), errors, retries;
- ``dicomweb`` (dicomweb-client) and ``dimse`` (pynetdicom): the two protocols;
- ``inbox``: pulled series land in a temporary folder renamed when complete;
- ``receiver``: ``medml listen``, a C-STORE SCP handing on each study once it is quiet;
- ``ledger``: the watermark and the (series, model version) ledger in the catalog;
- ``sr``: one DICOM Comprehensive SR per predicted series (highdicom);
- ``pull``: the steps the scheduled flow and ``medml pacs pull`` chain;
- ``orthanc``: a throwaway local Orthanc (tests, bench, a laptop demo).

Original identifiers (UIDs, the patient module) live only in memory and in the inbox while a
series is being processed; the catalog, the ledger and every report hold keyed hashes only.
"""
