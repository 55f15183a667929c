"""Getting a data set onto disk: from a URL, an archive or a folder to the folder of its images.

The way a source takes, one module a step: ``names`` (what it is called on disk), ``download``
(streamed into a partial file, checked, renamed into place), ``markers`` (what is the tool's and
may be replaced), ``unpack`` (one archive, member by member, under a budget), ``extract`` (the
wanted folder, from nested archives too, moved into place) and ``fetch``, the one call the data
module makes.
"""

from caltech_cli.sources.fetch import data_folder, fetch, is_fetched
from caltech_cli.sources.names import is_url
from caltech_cli.sources.unpack import Limits

__all__ = ["Limits", "data_folder", "fetch", "is_fetched", "is_url"]
