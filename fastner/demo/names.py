"""Name lists for the generated financial-news corpus, written for fastner (all invented or
generic: no list is copied from a dataset). Entities with several tokens are space-separated."""

FIRST_NAMES = [
    "Anna", "Marcus", "Lena", "David", "Sofia", "Thomas", "Priya", "Kenji", "Olivia", "Samuel",
    "Ingrid", "Rafael", "Mei", "Jonas", "Claire", "Omar", "Elena", "Victor", "Hannah", "Luca",
    "Amara", "Felix", "Nadia", "George", "Yuki", "Peter", "Isabel", "Daniel", "Fatima", "Henrik",
    "Maria", "Ravi", "Sarah", "Paulo", "Chen", "Laura", "Mikhail", "Grace", "Tobias", "Aisha",
]
LAST_NAMES = [
    "Hartmann", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Brennan", "Castillo", "Novak", "Schultz",
    "Fischer", "Kowalski", "Adeyemi", "Bianchi", "Whitfield", "Nakamura", "Duarte", "Petrov", "Haddad",
    "Sorensen", "Ramirez", "Kaur", "Ellison", "Vogel", "Marchetti", "Osei", "Lambert", "Iversen",
    "Dubois", "Yamamoto", "Carvalho", "Jansen", "Morgan", "Reyes", "Halvorsen", "Abbott", "Keller",
    "Sato", "Brandt", "Quinn", "Varga",
]
ORG_STEMS = [
    "Northwind", "Bluehaven", "Orion", "Meridian", "Silverline", "Redstone", "Altamira", "Corvus",
    "Harbor", "Granite", "Lumen", "Evergreen", "Stellar", "Ironbridge", "Crescent", "Summit",
    "Pinecrest", "Atlas", "Brightwater", "Kestrel", "Vantage", "Halcyon", "Sterling", "Ashford",
    "Nordic", "Pacifica", "Quantum", "Riverside", "Oakmont", "Zenith",
]
ORG_SUFFIXES = [
    "Capital", "Bank", "Holdings", "Group", "Motors", "Energy", "Systems", "Partners", "Pharma",
    "Airlines", "Telecom", "Insurance", "Mining", "Foods", "Logistics", "Semiconductor", "Corporation",
    "Securities", "Retail", "Steel",
]
INSTITUTIONS = [
    "Federal Reserve", "European Central Bank", "Bank of England", "Bank of Japan",
    "International Monetary Fund", "World Bank", "Securities and Exchange Commission",
    "European Commission", "Treasury", "OPEC",
]
CITIES = [
    "London", "New York", "Frankfurt", "Tokyo", "Hong Kong", "Singapore", "Zurich", "Paris",
    "Chicago", "Toronto", "Sydney", "Mumbai", "Shanghai", "Sao Paulo", "Dubai", "Madrid", "Milan",
    "Stockholm", "Seoul", "Johannesburg", "Amsterdam", "Oslo", "Mexico City", "Boston", "Houston",
    "Lagos", "Jakarta", "Vienna", "Dublin", "San Francisco",
]
COUNTRIES = [
    "Germany", "Japan", "Brazil", "Canada", "India", "China", "France", "Italy", "Spain", "Norway",
    "Australia", "South Africa", "Mexico", "Nigeria", "Indonesia", "Sweden", "Switzerland",
    "South Korea", "United States", "Britain",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
CURRENCY_SYMBOLS = ["$", "€", "£"]
CURRENCY_WORDS = ["dollars", "euros", "pounds", "yen", "francs"]
SCALES = ["million", "billion"]
ROLES = [
    "chief executive", "chief financial officer", "chairman", "analyst", "spokeswoman",
    "spokesman", "president", "head of research", "portfolio manager", "economist",
]
VERBS_UP = ["rose", "jumped", "climbed", "gained", "surged", "advanced"]
VERBS_DOWN = ["fell", "dropped", "slipped", "declined", "tumbled", "sank"]
